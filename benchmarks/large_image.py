"""Time and peak memory of one large image predicted in tiles (`Segmenter(tile_size=)`).

  .venv/bin/python benchmarks/large_image.py --saved_model=runs/pennfudan_mobilenet/export \
      --image=photo.jpg [--size=6000x4000] [--tile_size=1024] [--tile_overlap=256]

Resizes `--image` to `--size` (a stand-in for a camera's full-resolution photo), tries
the whole image (refused over the export's pixel limit), then predicts it in tiles, and
prints a table: tiles, instances, seconds, and the process's peak resident memory
(everything: TensorFlow, the model, the image and the instances' dense masks, which
take H x W bytes each).
"""

import argparse
import io
import os
import resource
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image

from instance_embed import tiling
from instance_embed.segmenter import Segmenter


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saved_model", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--size", default="6000x4000", help="WIDTHxHEIGHT")
    parser.add_argument("--tile_size", type=int, default=1024)
    parser.add_argument("--tile_overlap", type=int, default=256)
    args = parser.parse_args()

    width, height = (int(v) for v in args.size.split("x"))
    with Image.open(args.image) as source:
        image = np.asarray(source.convert("RGB").resize((width, height), Image.BILINEAR))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=92)

    whole = Segmenter.from_saved_model(args.saved_model)
    try:
        whole(buffer.getvalue())
        refusal = "accepted"
    except ValueError as e:
        refusal = str(e)
    tiled = Segmenter.from_saved_model(args.saved_model, tile_size=args.tile_size,
                                       tile_overlap=args.tile_overlap)
    tiles = (len(tiling.tile_origins(height, args.tile_size, args.tile_overlap))
             * len(tiling.tile_origins(width, args.tile_size, args.tile_overlap)))
    start = time.perf_counter()
    instances = tiled(buffer.getvalue())
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"whole image: {refusal}")
    print("| image | tile, overlap | tiles | instances (score >= 0.5) | seconds | peak RSS |")
    print("|---|---|---|---|---|---|")
    print(f"| {width}x{height} | {args.tile_size}, {args.tile_overlap} | {tiles} | "
          f"{len(instances)} ({len(instances.above(0.5))}) | {seconds:.1f} | "
          f"{peak_gb:.2f} GB |")


if __name__ == "__main__":
    main()
