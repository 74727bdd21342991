"""How much of each synthetic instance survives at the heads' resolution.

  .venv/bin/python experiments/stride_ceiling.py --sizes=128,192,256 --strides=2,4,8

For every instance of `--num_images` generated validation images, the mask a perfect
model at output stride s could produce is the block approximation of the instance (one
label per s x s cell, taken at the cell centre as the losses sample labels). Prints the
share of instances whose block approximation reaches IoU 0.5 and 0.7 with the true mask:
a ceiling on recall (and so on mAP^r) at those IoUs, whatever the embeddings.
"""

import argparse

import numpy as np

from instance_embed.data import synthetic_shapes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="128,192,256")
    parser.add_argument("--strides", default="2,4,8")
    parser.add_argument("--num_images", type=int, default=100)
    args = parser.parse_args()
    strides = [int(s) for s in args.strides.split(",")]
    print("image | " + " | ".join(f"stride {s} (IoU>=0.5 / 0.7)" for s in strides))
    print("--- | " + " | ".join("---" for _ in strides))
    for size in (int(s) for s in args.sizes.split(",")):
        config = synthetic_shapes.SyntheticShapesConfig(
            name="ceiling", image_size=size, num_train=0, num_validation=args.num_images,
            num_test=0)
        examples = [synthetic_shapes.generate_example(config, "validation", i)["instances"]
                    for i in range(args.num_images)]
        cells = []
        for stride in strides:
            ious = []
            for instances in examples:
                centre = stride // 2
                blocks = np.repeat(np.repeat(instances[centre::stride, centre::stride],
                                             stride, 0), stride, 1)[:size, :size]
                for k in range(1, instances.max() + 1):
                    truth, block = instances == k, blocks == k
                    ious.append((truth & block).sum() / (truth | block).sum())
            ious = np.array(ious)
            cells.append(f"{100 * np.mean(ious >= 0.5):.1f}% / {100 * np.mean(ious >= 0.7):.1f}%")
        print(f"{size}x{size} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
