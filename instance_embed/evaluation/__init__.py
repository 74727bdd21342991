"""Instance segmentation metrics: mAP^r (SDS protocol), recall vs proposals, COCO mask AP.

`InstanceEvaluator` streams over a split one image at a time (`add`) and reports, from
`result()`, the three families of numbers that experiments quote:

* mAP^r at IoU 0.5, 0.6 and 0.7, the paper's Table 1 (Hariharan et al. 2014, "SDS",
  as MNC and FCIS implement it);
* class-agnostic recall at IoU 0.5 against the number of proposals, the paper's Table 3
  (after Hosang et al.);
* COCO mask AP (IoU 0.50:0.95), AP50 and AP75, equal to `pycocotools`'
  `COCOeval(iouType="segm").stats[0:3]` on the same masks.

Modules: `matching` (mask overlaps, SDS and COCO matching, average precision),
`evaluator` (`InstanceEvaluator`), `report` (`metrics.json`, the Table 1 style table,
plots), `runner` (a model or predict function over a dataset split), `tuning`
(inference settings searched on stored network outputs). Everything but the runner and
the tuning is NumPy.

Exact choices (the `protocol` entry of every result names the options in force):

Mask IoU.
  Per image, one product of 0/1 matrices, the flattened prediction masks `[K, H*W]` times
  the indicators `[H*W, N+1]` of the ground-truth instances and of void pixels, gives
  every intersection and every prediction's area on void; it is evaluated on bit-packed
  masks (64 pixels per machine word: AND, then popcount), each indicator column over the
  words it touches only, so counts are exact integers and no float copy of the masks is
  made. (A float32 BLAS product is many times slower on small CPUs, where
  multi-threaded BLAS calls on such skinny matrices stall.)
  IoU = intersection / union with 0 where the union is empty.
  - Default: pixels labelled -1 (void) count neither in the intersection nor in the union,
    i.e. a prediction is clipped to the non-void pixels before its area is taken.
  - `ignore_as_background=True` (FCIS-style): void pixels are background, so a
    prediction's pixels on void enlarge the union.
  mAP^r and AR use the chosen convention. COCO AP always removes void pixels from the
  prediction masks (the masks one would hand to pycocotools), whatever the option.
  A ground-truth instance id listed in `gt_classes` without any pixel in `gt_instances`
  cannot be matched by any mask; it is left out of every count.

mAP^r (SDS protocol).
  For each class, all predictions of that class over the whole split are sorted by
  descending score with a stable sort (`np.argsort(-score, kind="mergesort")`), equal
  scores keeping the order of images as added and, within an image, the order of the
  predictions. Each prediction is compared with the ground-truth instance of its class in
  its image with which it has the highest IoU (ties: the lowest instance id, as
  `np.argmax`); it is a true positive when that IoU >= threshold and that instance has not
  been detected by an earlier prediction, otherwise a false positive. There is no
  fall-back to the next-best instance, and no cap on predictions per image. A prediction
  in an image without ground truth of its class is a false positive.
  AP = area under the precision-recall curve with precision made monotone
  (non-increasing), over all recall points (VOC 2010+ devkit). With `use_07_metric=True`,
  the VOC 2007 11-point value instead: the mean over t in `np.arange(0, 1.1, 0.1)` of the
  highest precision at recall >= t (0 if none), the thresholds computed as MNC and FCIS
  computed them. mAP^r = mean AP over classes with at least one ground-truth instance in
  the split; the AP of a class without ground truth is NaN (null in `metrics.json`).
  Because matching never crosses images and the global order restricted to one image is
  that image's own stable order, true/false positive flags are settled per image when
  the image is added; only scores and flags are kept.

Recall against proposals (AR).
  Class-agnostic. For each image the top-N predictions by score (same stable order) are
  kept; a ground-truth instance is recalled when any of them has IoU >= 0.5
  (`recall_iou_threshold`) with it, without one-to-one matching. Recall = recalled
  instances / all ground-truth instances of the split, for each N in `proposal_counts`.
  Per image only the rank of the first prediction reaching the threshold for each
  instance is kept (as a histogram over ranks).

COCO mask AP.
  As `COCOeval(iouType="segm")` with its default parameters, read at area "all" and
  maxDets=100: every instance is `iscrowd=0`; per image and class the predictions are
  sorted by descending score (stable) and cut to the first 100 (`coco_max_detections`);
  at each of the 10 IoU thresholds `np.linspace(0.5, 0.95, 10)` each prediction in turn
  takes the not yet matched instance with the highest IoU >= threshold (ties: the
  highest instance id, as COCOeval's loop), else it is unmatched. Over the split, per
  class, predictions are sorted by score (stable, images in the order added) and
  precision (made monotone) is read at the 101 recall points `np.linspace(0, 1, 101)`
  (0 beyond the highest recall reached). AP is the mean over IoU thresholds, recall
  points and classes with ground truth; AP50 and AP75 fix the threshold. Image ids in
  pycocotools terms are the positions 1, 2, ... in the order images were added.
  Per image only the scores and per-threshold match flags are kept.
"""

from instance_embed.evaluation.evaluator import (
    EvaluationCurves,
    InstanceEvaluator,
    PrecisionRecallCurve,
)
from instance_embed.evaluation.matching import (
    COCO_IOU_THRESHOLDS,
    DEFAULT_IOU_THRESHOLDS,
    DEFAULT_PROPOSAL_COUNTS,
)
from instance_embed.evaluation.report import (
    METRICS_FILENAME,
    format_table,
    save_plots,
    write_metrics_json,
)
from instance_embed.evaluation.runner import evaluate, evaluate_model, write_outputs
from instance_embed.evaluation.tuning import CachedNetwork, tune_inference, trials_table

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "DEFAULT_IOU_THRESHOLDS",
    "DEFAULT_PROPOSAL_COUNTS",
    "EvaluationCurves",
    "CachedNetwork",
    "InstanceEvaluator",
    "METRICS_FILENAME",
    "PrecisionRecallCurve",
    "evaluate",
    "evaluate_model",
    "format_table",
    "save_plots",
    "trials_table",
    "tune_inference",
    "write_metrics_json",
    "write_outputs",
]
