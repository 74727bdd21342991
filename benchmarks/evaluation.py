"""Speed of `InstanceEvaluator` on a generated split the size of PASCAL VOC 2012 val.

Default: 1449 images of 500x375 (width x height), a few ground-truth instances each
(rectangles and ellipses that occlude each other, with a void band like VOC's border),
and 100 predictions per image (jittered copies of the instances plus random rectangles
and ellipses), over 20 classes. Generating the data is timed apart from evaluating it;
the table reports the evaluator only (`add` for every image, then `result`).

    .venv/bin/python benchmarks/evaluation.py [--num_images=1449] [--predictions=100]

Target: under 2 minutes on 2 CPU cores. On a machine shared with other jobs the figure
varies with their load; the table prints the CPU count and the process CPU time.
"""

import argparse
import os
import resource
import sys
import time

import numpy as np

from instance_embed import evaluation


def _ellipse(mask, y0, y1, x0, x1):
    """Sets a filled ellipse inscribed in [y0, y1) x [x0, x1) of `mask` (in place)."""
    yy = (np.arange(y0, y1) + 0.5 - (y0 + y1) / 2) / ((y1 - y0) / 2)
    xx = (np.arange(x0, x1) + 0.5 - (x0 + x1) / 2) / ((x1 - x0) / 2)
    mask[y0:y1, x0:x1] |= yy[:, None] ** 2 + xx[None, :] ** 2 <= 1.0


def _random_box(rng, height, width, min_size=8):
    h = int(rng.integers(min_size, height // 2))
    w = int(rng.integers(min_size, width // 2))
    y0 = int(rng.integers(0, height - h))
    x0 = int(rng.integers(0, width - w))
    return y0, y0 + h, x0, x0 + w


def generate_image(rng, height, width, num_predictions, num_classes):
    """One image: (gt_instances [H,W], gt_classes [N], masks [K,H,W], classes, scores)."""
    num_instances = int(rng.integers(1, 6))
    gt = np.zeros((height, width), np.int32)
    classes = rng.integers(1, num_classes + 1, size=num_instances).astype(np.int32)
    boxes = []
    for i in range(num_instances):
        box = _random_box(rng, height, width)
        boxes.append(box)
        shape = np.zeros((height, width), bool)
        if rng.random() < 0.5:
            shape[box[0]:box[1], box[2]:box[3]] = True
        else:
            _ellipse(shape, *box)
        # A VOC-like void band around the object.
        grown = np.zeros_like(shape)
        grown[max(box[0] - 3, 0):box[1] + 3, max(box[2] - 3, 0):box[3] + 3] = True
        gt[grown & ~shape & (gt == 0)] = -1
        gt[shape] = i + 1

    # Random rectangles for all predictions at once (outer product of 1-D ranges) ...
    ys = np.arange(height)
    xs = np.arange(width)
    y0 = rng.integers(0, height - 8, size=num_predictions)
    x0 = rng.integers(0, width - 8, size=num_predictions)
    y1 = np.minimum(height, y0 + rng.integers(8, height // 2, size=num_predictions))
    x1 = np.minimum(width, x0 + rng.integers(8, width // 2, size=num_predictions))
    rows = (ys[None, :] >= y0[:, None]) & (ys[None, :] < y1[:, None])
    cols = (xs[None, :] >= x0[:, None]) & (xs[None, :] < x1[:, None])
    masks = rows[:, :, None] & cols[:, None, :]
    pred_classes = rng.integers(1, num_classes + 1, size=num_predictions).astype(np.int32)
    scores = rng.random(num_predictions) * 0.8
    # ... some turned into ellipses, and the first ones into jittered instances.
    for k in range(0, num_predictions, 4):
        masks[k] = False
        _ellipse(masks[k], int(y0[k]), int(y1[k]), int(x0[k]), int(x1[k]))
    for k in range(min(num_predictions, 2 * num_instances)):
        i = k % num_instances
        dy, dx = rng.integers(-4, 5, size=2)
        masks[k] = np.roll(gt == i + 1, (int(dy), int(dx)), axis=(0, 1))
        pred_classes[k] = classes[i] if rng.random() < 0.9 else pred_classes[k]
        scores[k] = 0.5 + 0.5 * rng.random()
    return gt, classes, masks, pred_classes, scores


def _state_nbytes(evaluator):
    total = 0
    stack = list(vars(evaluator).values())
    while stack:
        value = stack.pop()
        if isinstance(value, np.ndarray):
            total += value.nbytes
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=1449)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--predictions", type=int, default=100)
    parser.add_argument("--num_classes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    evaluator = evaluation.InstanceEvaluator(args.num_classes)
    generate_seconds = 0.0
    add_seconds = 0.0
    cpu_start = time.process_time()
    for _ in range(args.num_images):
        start = time.perf_counter()
        image = generate_image(rng, args.height, args.width, args.predictions,
                               args.num_classes)
        generate_seconds += time.perf_counter() - start
        start = time.perf_counter()
        evaluator.add(*image)
        add_seconds += time.perf_counter() - start
    start = time.perf_counter()
    result = evaluator.result()
    result_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    seconds = add_seconds + result_seconds
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    header = ("images", "size", "predictions", "seconds", "images/s", "add ms/img",
              "result s", "state MB", "peak RSS MB", "cpus")
    row = (f"{args.num_images}", f"{args.width}x{args.height}",
           f"{args.num_images * args.predictions}", f"{seconds:.1f}",
           f"{args.num_images / seconds:.1f}",
           f"{1000 * add_seconds / args.num_images:.1f}", f"{result_seconds:.2f}",
           f"{_state_nbytes(evaluator) / 2**20:.1f}", f"{peak_mb:.0f}", f"{os.cpu_count()}")
    widths = [max(len(h), len(r)) for h, r in zip(header, row)]
    print("InstanceEvaluator on generated data (data generation not included)")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("  ".join(r.rjust(w) for r, w in zip(row, widths)))
    print(f"data generation {generate_seconds:.1f} s; process CPU time {cpu_seconds:.1f} s "
          "(evaluation + generation); load average "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    print(f"mAP_r@0.5 {result['mAP_r@0.5']:.3f}  AR@0.5@100 {result['AR@0.5@100']:.3f}  "
          f"coco_mask_AP {result['coco_mask_AP']:.3f}  instances {result['num_instances']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
