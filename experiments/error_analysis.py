"""Where a trained model loses mAP^r: embeddings, seeds, suppression, classes or scores.

  .venv/bin/python experiments/error_analysis.py --model_dir=runs/demo [--split=test] \
      [--max_examples=100]

Runs the network once per image and measures, over the ground-truth instances of the
split, the share that reaches IoU >= 0.5 at each stage of the paper's inference:

1. **oracle** (heads resolution): the best mask any pixel of the instance grows at any
   tau, compared with the instance's labels at the heads' resolution. What the
   embeddings allow if seeds, taus and classes were perfect;
2. **oracle, full resolution**: the same masks brought to the image by repeating each
   heads pixel over its stride cell (what the resolution costs);
3. **detections**: the best of the model's K detections without suppression (what
   seed selection and the predicted tau keep);
4. **kept**: the best detection left after the run's suppression setting (the
   detections the evaluator sees).

It then sorts the kept detections into kinds (true positive, wrong class, duplicate,
poor mask with 0.2 <= IoU < 0.5, background with IoU < 0.2) and shows how many of each
score at least 0.5 / 0.8: false positives that outscore true positives are what turns
recall into lost average precision.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from absl import app
from absl import flags
import numpy as np

from instance_embed.evaluation import matching

FLAGS = flags.FLAGS

KINDS = ("true_positive", "wrong_class", "duplicate", "poor_mask", "background")
_POOR_MASK_IOU = 0.2


def define_flags():
    """Defined only when run as a program: tests import this module beside other mains."""
    flags.DEFINE_string("model_dir", None, "Run directory written by train_main.")
    flags.DEFINE_string("split", "test", "Split to analyse.")
    flags.DEFINE_integer("max_examples", 100, "Images to analyse (0 = all).")


def mask_ious(gt_instances: np.ndarray, masks: np.ndarray,
              num_instances: int | None = None) -> np.ndarray:
    """IoU of every mask with every instance: `[H, W]` labels, `[K, H, W]` -> `[K, N]`.

    Instance i (1..N; N = `num_instances`, default the largest label) is column i - 1;
    pixels labelled -1 (ignore) count in neither intersection nor union.
    """
    num = int(max(gt_instances.max(), 0)) if num_instances is None else num_instances
    # The evaluator's own counts, so that the stages agree with the reported mAP^r.
    return matching.ious_from_overlaps(matching.mask_overlaps(gt_instances, masks, num))


def detection_kinds(gt_instances: np.ndarray, gt_classes: np.ndarray, masks: np.ndarray,
                    classes: np.ndarray, iou_threshold: float = 0.5) -> list[str]:
    """The kind (one of `KINDS`) of each detection, detections given in score order.

    A detection is matched, as the evaluator does, to its best-IoU instance: a true
    positive if that IoU reaches `iou_threshold`, the class agrees and no earlier
    detection took the instance; a duplicate if an earlier one did; a wrong class if the
    classes differ; otherwise a poor mask (IoU >= 0.2) or background.
    """
    ious = mask_ious(gt_instances, masks, len(gt_classes))
    taken = set()
    kinds = []
    for k in range(len(masks)):
        if ious.shape[1] == 0:
            kinds.append("background")
            continue
        best = int(np.argmax(ious[k]))
        if ious[k, best] < iou_threshold:
            kinds.append("poor_mask" if ious[k, best] >= _POOR_MASK_IOU else "background")
        elif gt_classes[best] != classes[k]:
            kinds.append("wrong_class")
        elif best in taken:
            kinds.append("duplicate")
        else:
            kinds.append("true_positive")
            taken.add(best)
    return kinds


def oracle_best_ious(embeddings: np.ndarray, labels: np.ndarray, taus: Sequence[float],
                     gt_instances: np.ndarray | None = None, num_instances: int | None = None,
                     chunk: int = 64) -> np.ndarray:
    """Per instance, the best IoU of a mask grown from one of its own pixels at any tau.

    Args:
      embeddings: float `[h, w, d]` at the heads' resolution.
      labels: int `[h, w]`, the instance labels at that resolution (-1 ignore).
      taus: the similarity thresholds.
      gt_instances: optional full-resolution labels `[H, W]` (H = s * h): the masks are
        then compared with them after repeating each heads pixel over its s x s cell.
      num_instances: N (default: the largest label).
      chunk: seeds whose masks are made at once (bounds memory on large images).

    Returns:
      float `[N]` for instances 1..N (0 for an instance with no pixel at the heads'
      resolution).
    """
    h, w, dim = embeddings.shape
    reference = labels if gt_instances is None else gt_instances
    num = int(max(reference.max(), 0)) if num_instances is None else num_instances
    points = embeddings.reshape(-1, dim).astype(np.float64)
    norms = (points ** 2).sum(1)
    thresholds = np.log(2.0 / np.asarray(taus, np.float64) - 1.0)
    stride = 1 if gt_instances is None else gt_instances.shape[0] // h
    best = np.zeros(num)
    for i in range(1, num + 1):
        target = np.where(reference == i, 1, np.where(reference < 0, -1, 0))
        seeds = np.flatnonzero(labels.reshape(-1) == i)
        for start in range(0, len(seeds), chunk):
            part = seeds[start:start + chunk]
            d2 = norms[part, None] + norms[None, :] - 2.0 * points[part] @ points.T
            masks = (d2[None] <= thresholds[:, None, None]).reshape(-1, h, w)
            if stride > 1:
                masks = masks.repeat(stride, axis=1).repeat(stride, axis=2)
                masks = masks[:, :reference.shape[0], :reference.shape[1]]
            best[i - 1] = max(best[i - 1], mask_ious(target, masks, 1).max())
    return best


def main(argv):
    del argv
    import tensorflow as tf

    from instance_embed import data as datasets
    from instance_embed.inference import make_predict_fn
    from instance_embed.losses.sampling import labels_at_resolution
    from instance_embed.training import checkpoints

    model, config, path = checkpoints.restore_model(FLAGS.model_dir)
    print(f"checkpoint {path}, split {FLAGS.split}, inference {config.inference}")
    taus = config.model.taus
    kept_fn = make_predict_fn(model, taus, config.inference)
    raw_fn = make_predict_fn(
        model, taus, dataclasses.replace(config.inference, nms_iou_threshold=None,
                                   support_rescoring=0.0,
                                   score_threshold=0.0))
    examples = datasets.load(config.dataset.name, FLAGS.split,
                             data_dir=config.dataset.data_dir,
                             manual_dir=config.dataset.manual_dir,
                             config=config.dataset.builder_config)
    if FLAGS.max_examples:
        examples = examples.take(FLAGS.max_examples)
    stages = {"oracle, heads resolution": [], "oracle, full resolution": [],
              "detections (no suppression)": [], "kept detections": []}
    kinds, scores = [], []
    for example in examples:
        image = example["image"][tf.newaxis]
        gt, gt_classes = example["instances"].numpy(), example["instance_classes"].numpy()
        raw, kept = raw_fn(image), kept_fn(image)
        embeddings = raw["embeddings"][0].numpy()
        h, w = embeddings.shape[:2]
        # The network saw the image padded to a multiple of 32: crop its heads to the
        # cells that cover the image.
        stride = config.model.output_stride
        h, w = -(-gt.shape[0] // stride), -(-gt.shape[1] // stride)
        embeddings = embeddings[:h, :w]
        padded = np.pad(gt, [(0, h * stride - gt.shape[0]), (0, w * stride - gt.shape[1])],
                        constant_values=-1)
        labels = labels_at_resolution(padded[None], (h, w)).numpy()[0]
        num = len(gt_classes)
        present = np.isin(np.arange(1, num + 1), gt)  # instances the evaluator counts
        stages["oracle, heads resolution"].append(
            oracle_best_ious(embeddings, labels, taus, num_instances=num)[present])
        stages["oracle, full resolution"].append(
            oracle_best_ious(embeddings, labels, taus, padded, num_instances=num)[present])
        for name, outputs in (("detections (no suppression)", raw), ("kept detections", kept)):
            count = int(outputs["num_detections"][0])
            masks = outputs["detection_masks"][0, :count].numpy().astype(bool)
            best = mask_ious(gt, masks, num).max(axis=0) if count else np.zeros(num)
            stages[name].append(best[present])
        count = int(kept["num_detections"][0])
        kinds += detection_kinds(gt, gt_classes,
                                 kept["detection_masks"][0, :count].numpy().astype(bool),
                                 kept["detection_classes"][0, :count].numpy())
        scores += list(kept["detection_scores"][0, :count].numpy())

    print("\nShare of ground-truth instances reaching IoU 0.5 / 0.7:")
    print("| stage | IoU >= 0.5 | IoU >= 0.7 | mean best IoU |\n|---|---|---|---|")
    for name, values in stages.items():
        values = np.concatenate(values) if values else np.zeros(0)
        print(f"| {name} | {np.mean(values >= 0.5):.1%} | {np.mean(values >= 0.7):.1%} | "
              f"{values.mean():.3f} |")
    kinds, scores = np.asarray(kinds), np.asarray(scores)
    print("\nKept detections by kind:")
    print("| kind | detections | mean score | score >= 0.5 | score >= 0.8 |\n|---|---|---|---|---|")
    for kind in KINDS:
        chosen = scores[kinds == kind]
        mean = f"{chosen.mean():.2f}" if len(chosen) else "-"
        print(f"| {kind} | {len(chosen)} | {mean} | {np.sum(chosen >= 0.5)} | "
              f"{np.sum(chosen >= 0.8)} |")


if __name__ == "__main__":
    define_flags()
    flags.mark_flag_as_required("model_dir")
    app.run(main)
