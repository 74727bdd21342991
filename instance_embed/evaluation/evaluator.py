"""`InstanceEvaluator`: mAP^r (SDS protocol), recall against proposals and COCO mask AP
over a split, streamed one image at a time (`add`), reported by `result()`.

The exact protocol (mask IoU, matching, AP, COCO) is in the package docstring,
`instance_embed/evaluation/__init__.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from instance_embed.evaluation.matching import COCO_IOU_THRESHOLDS
from instance_embed.evaluation.matching import DEFAULT_IOU_THRESHOLDS
from instance_embed.evaluation.matching import DEFAULT_PROPOSAL_COUNTS
from instance_embed.evaluation.matching import average_precision
from instance_embed.evaluation.matching import coco_greedy_match
from instance_embed.evaluation.matching import coco_precision
from instance_embed.evaluation.matching import ious_from_overlaps
from instance_embed.evaluation.matching import mask_overlaps
from instance_embed.evaluation.matching import sds_true_positives


@dataclasses.dataclass(frozen=True)
class PrecisionRecallCurve:
    """Precision-recall curve of one class at one IoU threshold (SDS protocol).

    Attributes:
      recall: float64 [n], after each prediction in descending score order.
      precision: float64 [n].
      average_precision: the class' AP^r.
      num_instances: ground-truth instances of the class in the split.
    """

    recall: np.ndarray
    precision: np.ndarray
    average_precision: float
    num_instances: int


@dataclasses.dataclass(frozen=True)
class EvaluationCurves:
    """What `save_plots` draws.

    Attributes:
      iou_threshold: IoU threshold of the precision-recall curves.
      precision_recall: class name -> curve, for classes with ground truth.
      num_proposals: int [P], 1..max(proposal_counts).
      recall: float64 [P], class-agnostic recall with that many proposals per image.
      recall_iou_threshold: IoU threshold of the recall.
      proposal_counts: the counts reported in the result.
    """

    iou_threshold: float
    precision_recall: dict[str, PrecisionRecallCurve]
    num_proposals: np.ndarray
    recall: np.ndarray
    recall_iou_threshold: float
    proposal_counts: tuple[int, ...]


def _as_vector(values, empty_dtype) -> np.ndarray:
    """np.asarray, with any empty input (e.g. `[]`) as a [0] array of `empty_dtype`."""
    values = np.asarray(values)
    return values.reshape(0).astype(empty_dtype) if values.size == 0 else values


def _check_threshold(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


class InstanceEvaluator:
    """Streaming evaluator of instance masks; see the module docstring for the protocol.

    Usage:
      evaluator = InstanceEvaluator(num_classes=20, class_names=VOC_NAMES)
      for example, prediction in ...:
        evaluator.add(example["instances"], example["instance_classes"],
                      prediction["masks"], prediction["classes"], prediction["scores"])
      metrics = evaluator.result()
    """

    def __init__(
        self,
        num_classes: int,
        iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
        proposal_counts: Sequence[int] = DEFAULT_PROPOSAL_COUNTS,
        class_names: Sequence[str] | None = None,
        use_07_metric: bool = False,
        ignore_as_background: bool = False,
        recall_iou_threshold: float = 0.5,
        coco_max_detections: int = 100,
    ):
        """Creates an empty evaluator.

        Args:
          num_classes: C, number of foreground classes (ids 1..C).
          iou_thresholds: IoU thresholds of mAP^r.
          proposal_counts: numbers of top-scored predictions per image for the recall.
          class_names: C foreground names, for result keys and plots (default
            "class_1".."class_C").
          use_07_metric: VOC 2007 11-point AP for mAP^r instead of the all-points area.
          ignore_as_background: count void (-1) pixels as background in the IoU of
            mAP^r and recall (FCIS-style) instead of leaving them out.
          recall_iou_threshold: IoU at which an instance counts as recalled.
          coco_max_detections: COCO's maxDets, per image and class.
        """
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
        self.num_classes = int(num_classes)
        self.iou_thresholds = tuple(
            _check_threshold(t, "iou_thresholds") for t in iou_thresholds)
        if not self.iou_thresholds:
            raise ValueError("iou_thresholds must not be empty")
        counts = tuple(int(n) for n in proposal_counts)
        if not counts or any(n < 1 or n != m for n, m in zip(counts, proposal_counts)):
            raise ValueError(
                f"proposal_counts must be positive integers, got {tuple(proposal_counts)}")
        self.proposal_counts = counts
        if class_names is None:
            class_names = [f"class_{c}" for c in range(1, self.num_classes + 1)]
        class_names = [str(name) for name in class_names]
        if len(class_names) != self.num_classes:
            raise ValueError(f"class_names must have num_classes={self.num_classes} "
                             f"names, got {len(class_names)}")
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be unique, got {class_names}")
        self.class_names = tuple(class_names)
        self.use_07_metric = bool(use_07_metric)
        self.ignore_as_background = bool(ignore_as_background)
        self.recall_iou_threshold = _check_threshold(recall_iou_threshold,
                                                     "recall_iou_threshold")
        if int(coco_max_detections) != coco_max_detections or coco_max_detections < 1:
            raise ValueError(
                f"coco_max_detections must be a positive integer, got {coco_max_detections}")
        self.coco_max_detections = int(coco_max_detections)
        self.reset()

    @property
    def protocol(self) -> str:
        """One line naming the options a result was computed with."""
        ap = "VOC07 11-point" if self.use_07_metric else "all-points (VOC2010+)"
        void = ("void=background (FCIS)" if self.ignore_as_background
                else "void pixels excluded from IoU")
        return (f"mAP^r: SDS matching, {ap} AP, {void}; "
                f"AR: class-agnostic, top-N per image, IoU>={self.recall_iou_threshold:g}; "
                f"COCO segm AP: maxDets={self.coco_max_detections}, area=all, "
                "void pixels removed from masks")

    @property
    def num_images(self) -> int:
        return self._num_images

    def reset(self) -> None:
        """Forgets every image added so far."""
        self._num_images = 0
        self._num_instances = 0
        # Index 0 is unused so that class ids index directly.
        self._num_gt = np.zeros(self.num_classes + 1, np.int64)
        self._sds_scores: list[list[np.ndarray]] = [[] for _ in range(self.num_classes + 1)]
        self._sds_tp: list[list[np.ndarray]] = [[] for _ in range(self.num_classes + 1)]
        self._coco_scores: list[list[np.ndarray]] = [[] for _ in range(self.num_classes + 1)]
        self._coco_matched: list[list[np.ndarray]] = [
            [] for _ in range(self.num_classes + 1)]
        # _first_recall_rank[r]: instances first recalled by the prediction of rank r.
        self._first_recall_rank = np.zeros(max(self.proposal_counts), np.int64)

    def _validate(self, gt_instances, gt_classes, pred_masks, pred_classes, pred_scores):
        """Checks and converts the arguments of `add`; errors name the argument."""
        gt_instances = np.asarray(gt_instances)
        if gt_instances.ndim != 2 or not np.issubdtype(gt_instances.dtype, np.integer):
            raise ValueError("gt_instances must be an integer array [H, W], got "
                             f"{gt_instances.dtype} {gt_instances.shape}")
        gt_classes = _as_vector(gt_classes, np.int64)
        if gt_classes.ndim != 1 or not np.issubdtype(gt_classes.dtype, np.integer):
            raise ValueError("gt_classes must be an integer array [N], got "
                             f"{gt_classes.dtype} {gt_classes.shape}")
        num_instances = gt_classes.shape[0]
        if gt_instances.size:
            low, high = int(gt_instances.min()), int(gt_instances.max())
            if low < -1 or high > num_instances:
                raise ValueError(
                    f"gt_instances values must be in [-1, {num_instances}] (N = "
                    f"len(gt_classes)), got [{low}, {high}]")
        if num_instances and (gt_classes.min() < 1 or gt_classes.max() > self.num_classes):
            raise ValueError(f"gt_classes must be in [1, {self.num_classes}], got "
                             f"{gt_classes.tolist()}")

        pred_masks = np.asarray(pred_masks)
        if pred_masks.size == 0:
            pred_masks = pred_masks.reshape((0,) + gt_instances.shape).astype(bool)
        if pred_masks.ndim != 3 or pred_masks.shape[1:] != gt_instances.shape:
            raise ValueError(f"pred_masks must be [K, {gt_instances.shape[0]}, "
                             f"{gt_instances.shape[1]}] like gt_instances, got "
                             f"{pred_masks.shape}")
        if pred_masks.dtype != bool:
            if not np.issubdtype(pred_masks.dtype, np.integer):
                raise ValueError("pred_masks must be boolean (or integer 0/1), got "
                                 f"{pred_masks.dtype}")
            pred_masks = pred_masks != 0
        num_preds = pred_masks.shape[0]
        pred_classes = _as_vector(pred_classes, np.int64)
        if pred_classes.shape != (num_preds,) or not np.issubdtype(pred_classes.dtype,
                                                                   np.integer):
            raise ValueError(f"pred_classes must be an integer array [{num_preds}], got "
                             f"{pred_classes.dtype} {pred_classes.shape}")
        if num_preds and (pred_classes.min() < 1 or pred_classes.max() > self.num_classes):
            raise ValueError(f"pred_classes must be in [1, {self.num_classes}], got "
                             f"values in [{pred_classes.min()}, {pred_classes.max()}]")
        pred_scores = _as_vector(pred_scores, np.float64)
        if pred_scores.shape != (num_preds,):
            raise ValueError(f"pred_scores must be an array [{num_preds}], got "
                             f"{pred_scores.shape}")
        pred_scores = pred_scores.astype(np.float64)
        if not np.all(np.isfinite(pred_scores)):
            raise ValueError("pred_scores must be finite")
        return (gt_instances, gt_classes.astype(np.int64), pred_masks,
                pred_classes.astype(np.int64), pred_scores)

    def add(self, gt_instances, gt_classes, pred_masks, pred_classes, pred_scores) -> None:
        """Adds one image; keeps only scores, match flags and counts.

        Args:
          gt_instances: int [H, W], 0 background, 1..N instance ids, -1 void.
          gt_classes: int [N], class (1..C) of instance i at index i - 1.
          pred_masks: bool [K, H, W] (integer masks: nonzero = inside).
          pred_classes: int [K], classes 1..C.
          pred_scores: float [K].
        """
        gt_instances, gt_classes, pred_masks, pred_classes, pred_scores = self._validate(
            gt_instances, gt_classes, pred_masks, pred_classes, pred_scores)
        overlaps = mask_overlaps(gt_instances, pred_masks, gt_classes.shape[0])
        ious = ious_from_overlaps(overlaps, self.ignore_as_background)
        coco_ious = (ious_from_overlaps(overlaps, False) if self.ignore_as_background
                     else ious)

        present = overlaps.gt_areas > 0
        self._num_images += 1
        self._num_instances += int(present.sum())
        self._num_gt += np.bincount(gt_classes[present], minlength=self.num_classes + 1)

        order = np.argsort(-pred_scores, kind="mergesort")
        self._add_recall(ious[order][:, present])

        classes = np.union1d(pred_classes, gt_classes[present])
        sorted_classes = pred_classes[order]
        for c in classes:
            preds = order[sorted_classes == c]
            gts = np.flatnonzero(present & (gt_classes == c))
            if preds.size == 0:
                continue
            self._sds_scores[c].append(pred_scores[preds])
            self._sds_tp[c].append(
                sds_true_positives(ious[np.ix_(preds, gts)], self.iou_thresholds))
            preds = preds[:self.coco_max_detections]
            self._coco_scores[c].append(pred_scores[preds])
            self._coco_matched[c].append(
                coco_greedy_match(coco_ious[np.ix_(preds, gts)], COCO_IOU_THRESHOLDS))

    def _add_recall(self, ious: np.ndarray) -> None:
        """ious: [K, G], predictions in descending score order against the instances."""
        if ious.size == 0:
            return
        hits = ious >= self.recall_iou_threshold
        first = np.argmax(hits, axis=0)[hits.any(axis=0)]
        first = first[first < self._first_recall_rank.size]
        self._first_recall_rank += np.bincount(first, minlength=self._first_recall_rank.size)

    def _sorted_sds_flags(self, c: int) -> np.ndarray:
        """bool [T, n]: the class' true-positive flags in split-wide score order."""
        if not self._sds_scores[c]:
            return np.zeros((len(self.iou_thresholds), 0), bool)
        scores = np.concatenate(self._sds_scores[c])
        flags = np.concatenate(self._sds_tp[c], axis=1)
        return flags[:, np.argsort(-scores, kind="mergesort")]

    def _recall_curve(self) -> np.ndarray:
        """float64 [max N]: recall with 1..max N proposals per image (NaN if no GT)."""
        recalled = np.cumsum(self._first_recall_rank)
        if self._num_instances == 0:
            return np.full(recalled.shape, np.nan)
        return recalled / self._num_instances

    def _coco_metrics(self) -> tuple[float, float, float]:
        per_class = []
        for c in range(1, self.num_classes + 1):
            if self._num_gt[c] == 0:
                continue
            if self._coco_scores[c]:
                scores = np.concatenate(self._coco_scores[c])
                matched = np.concatenate(self._coco_matched[c], axis=1)
                matched = matched[:, np.argsort(-scores, kind="mergesort")]
            else:
                matched = np.zeros((COCO_IOU_THRESHOLDS.size, 0), bool)
            per_class.append(coco_precision(matched, int(self._num_gt[c])))
        if not per_class:
            return math.nan, math.nan, math.nan
        precision = np.stack(per_class, axis=1)  # [T, K, R]
        t50 = int(np.argmin(np.abs(COCO_IOU_THRESHOLDS - 0.5)))
        t75 = int(np.argmin(np.abs(COCO_IOU_THRESHOLDS - 0.75)))
        return (float(np.mean(precision)), float(np.mean(precision[t50])),
                float(np.mean(precision[t75])))

    def result(self) -> dict[str, Any]:
        """The metrics as a flat dict (see the module docstring for definitions).

        Keys: `mAP_r@<thr>`, `AP_r@<thr>/<class name>` (NaN for classes without ground
        truth), `AR@<recall thr>@<N>`, `coco_mask_AP`, `coco_mask_AP50`,
        `coco_mask_AP75`, `num_images`, `num_instances`, and `protocol` (a string naming
        the options in force). Values are fractions in [0, 1].
        """
        per_class = np.full((len(self.iou_thresholds), self.num_classes), np.nan)
        for c in range(1, self.num_classes + 1):
            if self._num_gt[c] == 0:
                continue
            flags = self._sorted_sds_flags(c)
            for t in range(len(self.iou_thresholds)):
                per_class[t, c - 1] = average_precision(
                    flags[t], int(self._num_gt[c]), self.use_07_metric)[0]
        out: dict[str, Any] = {}
        has_gt = self._num_gt[1:] > 0
        for t, threshold in enumerate(self.iou_thresholds):
            out[f"mAP_r@{threshold:g}"] = (float(np.mean(per_class[t, has_gt]))
                                           if has_gt.any() else math.nan)
        for t, threshold in enumerate(self.iou_thresholds):
            for c, name in enumerate(self.class_names):
                out[f"AP_r@{threshold:g}/{name}"] = float(per_class[t, c])
        recall = self._recall_curve()
        for n in self.proposal_counts:
            out[f"AR@{self.recall_iou_threshold:g}@{n}"] = float(recall[n - 1])
        ap, ap50, ap75 = self._coco_metrics()
        out["coco_mask_AP"] = ap
        out["coco_mask_AP50"] = ap50
        out["coco_mask_AP75"] = ap75
        out["num_images"] = self._num_images
        out["num_instances"] = self._num_instances
        out["protocol"] = self.protocol
        return out

    def curves(self, iou_threshold: float | None = None) -> EvaluationCurves:
        """Precision-recall curves per class and recall against proposals.

        Args:
          iou_threshold: one of `iou_thresholds`; default 0.5 if present, else the first.
        """
        if iou_threshold is None:
            iou_threshold = 0.5 if 0.5 in self.iou_thresholds else self.iou_thresholds[0]
        if iou_threshold not in self.iou_thresholds:
            raise ValueError(f"iou_threshold must be one of {self.iou_thresholds}, got "
                             f"{iou_threshold}")
        t = self.iou_thresholds.index(iou_threshold)
        curves = {}
        for c in range(1, self.num_classes + 1):
            if self._num_gt[c] == 0:
                continue
            ap, recall, precision = average_precision(
                self._sorted_sds_flags(c)[t], int(self._num_gt[c]), self.use_07_metric)
            curves[self.class_names[c - 1]] = PrecisionRecallCurve(
                recall, precision, ap, int(self._num_gt[c]))
        recall = self._recall_curve()
        return EvaluationCurves(
            iou_threshold=float(iou_threshold),
            precision_recall=curves,
            num_proposals=np.arange(1, recall.size + 1),
            recall=recall,
            recall_iou_threshold=self.recall_iou_threshold,
            proposal_counts=self.proposal_counts,
        )
