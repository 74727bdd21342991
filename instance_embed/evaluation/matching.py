"""Matching predicted masks to ground truth, and average precision (NumPy).

The building blocks of `InstanceEvaluator` (see `evaluator.py` for the protocol):
exact mask overlaps on bit-packed masks, the SDS and COCO matchings, and the two ways
of reading precision along recall (all-points or 11-point, COCO's 101 points).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

DEFAULT_IOU_THRESHOLDS = (0.5, 0.6, 0.7)


DEFAULT_PROPOSAL_COUNTS = (10, 20, 50, 100, 200, 500, 1000)


# The exact arrays COCOeval builds in `Params.setDetParams`.
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1,
                                  endpoint=True)


COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1,
                                     endpoint=True)


# MNC and FCIS loop over `np.arange(0., 1.1, 0.1)`, whose 0.3 is 0.30000000000000004:
# kept as is so that the 11-point option reproduces the numbers they printed.
VOC07_RECALL_THRESHOLDS = np.arange(0.0, 1.1, 0.1)


@dataclasses.dataclass(frozen=True)
class MaskOverlaps:
    """Pixel counts between the predictions and the ground-truth instances of one image.

    Attributes:
      intersections: int64 [K, N], pixels shared by prediction k and instance n + 1.
      pred_areas: int64 [K], pixels of each prediction, void pixels included.
      pred_void_areas: int64 [K], pixels of each prediction that are void (-1).
      gt_areas: int64 [N], pixels of each instance.
    """

    intersections: np.ndarray
    pred_areas: np.ndarray
    pred_void_areas: np.ndarray
    gt_areas: np.ndarray


def _pack_rows(bits: np.ndarray) -> np.ndarray:
    """bool [R, P] -> uint64 [R, ceil(P / 64)], 64 pixels per word, zero-padded."""
    packed = np.packbits(bits, axis=1)
    pad = -packed.shape[1] % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return np.ascontiguousarray(packed).view(np.uint64)


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _popcount_rows(words: np.ndarray) -> np.ndarray:
    """uint64 [R, W] -> int64 [R]: set bits per row."""
    if hasattr(np, "bitwise_count"):  # NumPy >= 2.0
        return np.bitwise_count(words).sum(axis=1, dtype=np.int64)
    return _BYTE_POPCOUNT[np.ascontiguousarray(words).view(np.uint8)].sum(
        axis=1, dtype=np.int64)


def mask_overlaps(gt_instances: np.ndarray, pred_masks: np.ndarray,
                  num_instances: int) -> MaskOverlaps:
    """Counts intersections and areas as one product of 0/1 matrices.

    The product of the predictions `[K, H*W]` with the indicators `[H*W, N+1]` of the
    instances and of void is evaluated on bit-packed rows (64 pixels per word: AND, then
    popcount), each indicator column only over the words it touches. Counts are exact.

    Args:
      gt_instances: int [H, W], 0 background, 1..N instance ids, -1 void.
      pred_masks: bool [K, H, W] (nonzero = inside).
      num_instances: N, the number of instance ids (ids above N must not occur).

    Returns:
      The `MaskOverlaps` of the image.
    """
    num_pixels = gt_instances.size
    num_preds = pred_masks.shape[0]
    labels = gt_instances.reshape(num_pixels)
    foreground = labels > 0
    gt_areas = np.bincount(labels[foreground], minlength=num_instances + 1)[1:]
    gt_areas = gt_areas.astype(np.int64)
    intersections = np.zeros((num_preds, num_instances), np.int64)
    void_areas = np.zeros((num_preds,), np.int64)
    if num_preds == 0:
        return MaskOverlaps(intersections, void_areas.copy(), void_areas, gt_areas)

    masks = _pack_rows(pred_masks.reshape(num_preds, num_pixels))
    # Rows only for instances with pixels (the others intersect nothing), then void.
    ids = np.flatnonzero(gt_areas) + 1
    has_void = bool(np.any(labels == -1))
    if has_void:
        ids = np.append(ids, -1)
    indicators = _pack_rows(labels[None, :] == ids[:, None])
    for instance_id, row in zip(ids, indicators):
        words = np.flatnonzero(row)
        counts = _popcount_rows(masks[:, words] & row[words])
        if instance_id == -1:
            void_areas = counts
        else:
            intersections[:, instance_id - 1] = counts
    return MaskOverlaps(
        intersections=intersections,
        pred_areas=_popcount_rows(masks),
        pred_void_areas=void_areas,
        gt_areas=gt_areas,
    )


def ious_from_overlaps(overlaps: MaskOverlaps, ignore_as_background: bool = False
                       ) -> np.ndarray:
    """IoU float64 [K, N] of each prediction with each instance; 0 for an empty union.

    Args:
      overlaps: counts from `mask_overlaps`.
      ignore_as_background: if False, void pixels of a prediction are left out of its
        area (they are in no union); if True, they are background and count.
    """
    pred_areas = overlaps.pred_areas
    if not ignore_as_background:
        pred_areas = pred_areas - overlaps.pred_void_areas
    inter = overlaps.intersections.astype(np.float64)
    union = (pred_areas[:, None] + overlaps.gt_areas[None, :]).astype(np.float64) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def sds_true_positives(ious: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """SDS matching of one image and class: bool [T, k] true-positive flags.

    Args:
      ious: float [k, g], predictions in descending score order against the instances.
      thresholds: the T IoU thresholds.
    """
    num_preds, num_gt = ious.shape
    tp = np.zeros((len(thresholds), num_preds), bool)
    if num_preds == 0 or num_gt == 0:
        return tp
    best_instance = np.argmax(ious, axis=1)
    best_iou = ious[np.arange(num_preds), best_instance]
    for t, threshold in enumerate(thresholds):
        candidates = np.flatnonzero(best_iou >= threshold)
        # The first candidate (in score order) aimed at an instance detects it; every later
        # one aimed at the same instance is a duplicate. Candidates below the threshold
        # detect nothing, so they do not block later ones.
        _, first = np.unique(best_instance[candidates], return_index=True)
        tp[t, candidates[first]] = True
    return tp


def coco_greedy_match(ious: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """COCOeval's per-image, per-category matching: bool [T, k] matched flags.

    Args:
      ious: float [k, g], predictions in descending score order (already cut to
        maxDets) against the instances in id order.
      thresholds: float [T] IoU thresholds.
    """
    num_preds, num_gt = ious.shape
    num_thresholds = len(thresholds)
    matched = np.zeros((num_thresholds, num_preds), bool)
    if num_preds == 0 or num_gt == 0:
        return matched
    limits = np.minimum(np.asarray(thresholds, np.float64), 1 - 1e-10)[:, None]
    taken = np.zeros((num_thresholds, num_gt), bool)
    rows = np.arange(num_thresholds)
    # A prediction below the lowest threshold with every instance matches nothing and
    # changes no state, so only the others need the sequential pass.
    for d in np.flatnonzero(ious.max(axis=1) >= limits.min()):
        eligible = (ious[d][None, :] >= limits) & ~taken
        candidates = np.where(eligible, ious[d][None, :], -1.0)
        # COCOeval replaces its choice on equal IoU, so the last best instance wins.
        best = num_gt - 1 - np.argmax(candidates[:, ::-1], axis=1)
        hit = eligible[rows, best]
        matched[hit, d] = True
        taken[rows[hit], best[hit]] = True
    return matched


def average_precision(tp: np.ndarray, num_positives: int, use_07_metric: bool = False
                      ) -> tuple[float, np.ndarray, np.ndarray]:
    """VOC average precision of flags in descending score order.

    Args:
      tp: bool [n], true-positive flags sorted by descending score.
      num_positives: number of ground-truth instances (> 0).
      use_07_metric: VOC 2007 11-point AP instead of the all-points area.

    Returns:
      (AP, recall float64 [n], precision float64 [n]).
    """
    tp_cum = np.cumsum(tp, dtype=np.float64)
    fp_cum = np.cumsum(~tp, dtype=np.float64)
    recall = tp_cum / num_positives
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    if tp.size == 0:
        return 0.0, recall, precision
    if use_07_metric:
        points = [precision[recall >= t].max() if np.any(recall >= t) else 0.0
                  for t in VOC07_RECALL_THRESHOLDS]
        return float(np.mean(points)), recall, precision
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    recall_steps = np.diff(recall, prepend=0.0)
    return float(np.sum(recall_steps * envelope)), recall, precision


def coco_precision(matched: np.ndarray, num_positives: int) -> np.ndarray:
    """COCOeval's interpolated precision at the 101 recall points: float64 [T, 101].

    Args:
      matched: bool [T, n], match flags sorted by descending score over the split.
      num_positives: number of ground-truth instances (> 0).
    """
    num_thresholds, num_dets = matched.shape
    tp_sum = np.cumsum(matched, axis=1).astype(np.float64)
    fp_sum = np.cumsum(~matched, axis=1).astype(np.float64)
    recall = tp_sum / num_positives
    precision = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    out = np.zeros((num_thresholds, COCO_RECALL_THRESHOLDS.size))
    for t in range(num_thresholds):
        index = np.searchsorted(recall[t], COCO_RECALL_THRESHOLDS, side="left")
        reached = index < num_dets
        out[t, reached] = envelope[t, index[reached]]
    return out
