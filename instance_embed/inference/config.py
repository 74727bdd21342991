"""`InferenceConfig`: how detections are made from the network's outputs.

The similarity thresholds are not here: they are the model's (`ModelConfig.taus`, one
slice of the classification head each), and the inference functions take them from it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from instance_embed.ops import checks

MASK_UPSAMPLING = ("bilinear", "joint_bilateral")


@dataclasses.dataclass
class InferenceConfig:
    """How detections are made from the network's outputs.

    Attributes:
      num_seeds: K, the number of seeds (and detections, valid or not) per image.
        The paper uses 100 (Table 3).
      alpha: weight of embedding diversity against seediness when picking seeds
        (paper Table 2: 0.3 is best). 0 picks seeds by seediness alone.
      score_threshold: detections scoring below it are dropped. 0 keeps all (paper).
      nms_iou_threshold: when set, a mask whose IoU with a higher-scored kept mask
        exceeds it is dropped (near-duplicate suppression, IoU measured at the heads'
        resolution). None disables it (paper).
      support_rescoring: with suppression on, each kept detection's score is scaled by
        `min(1, n / support_rescoring)`, where n counts the detections it suppressed
        plus itself: an instance draws many seeds whose masks nearly coincide, a
        spurious or poor mask few. 0 (default, the paper's scoring) turns it off.
      mask_upsampling: how masks reach the input resolution (see `ops.upsampling`):
        "bilinear" (the 0/1 mask resized bilinearly, boundaries on the stride-cell
        grid) or "joint_bilateral" (boundaries inside a cell follow the image's colour
        edges; needs the images).
      bilateral_sigma: the colour distance (RGB in 0-255) of "joint_bilateral": a cell
        whose mean colour is this much farther from a pixel's colour than the closest
        cell's weighs exp(-1/2) as much.
      flip_tta: test-time augmentation by a horizontal flip: the network also runs on
        each image's mirror, and the class probabilities of both (the second flipped
        back) are averaged before seeds are chosen and scored. Embeddings are the
        image's own: they are not mirror-equivariant, and a mask needs one embedding
        space. Twice the network's time.
      jit_compile: run the heads-resolution post-processing (`select_detections`:
        seeds, masks, suppression) as one XLA computation
        (`predictor.predict_from_outputs`); drawing at the image's resolution stays in
        plain TF ops. Same results; compiled again for every new heads size.
        For fixed-size inputs; TF Serving runs it with
        `--xla_cpu_compilation_enabled=true`.
    """

    num_seeds: int = 100
    alpha: float = 0.3
    score_threshold: float = 0.0
    nms_iou_threshold: float | None = None
    support_rescoring: float = 0.0
    mask_upsampling: str = "bilinear"
    bilateral_sigma: float = 10.0
    flip_tta: bool = False
    jit_compile: bool = False

    def __post_init__(self):
        if (isinstance(self.num_seeds, bool) or not isinstance(self.num_seeds, numbers.Integral)
                or self.num_seeds < 1):
            _config_error("num_seeds", self.num_seeds, "must be a positive integer")
        self.num_seeds = int(self.num_seeds)
        if not checks.is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha < 0:
            _config_error("alpha", self.alpha, "must be a finite number >= 0")
        if not checks.is_real(self.score_threshold) or not 0 <= self.score_threshold <= 1:
            _config_error("score_threshold", self.score_threshold, "must be in [0, 1]")
        if self.mask_upsampling not in MASK_UPSAMPLING:
            _config_error("mask_upsampling", self.mask_upsampling,
                          f"must be one of {', '.join(MASK_UPSAMPLING)}")
        if (not checks.is_real(self.bilateral_sigma) or not math.isfinite(self.bilateral_sigma)
                or self.bilateral_sigma <= 0):
            _config_error("bilateral_sigma", self.bilateral_sigma, "must be a finite number > 0")
        self.bilateral_sigma = float(self.bilateral_sigma)
        for field in ("flip_tta", "jit_compile"):
            if not isinstance(getattr(self, field), bool):
                _config_error(field, getattr(self, field), "must be True or False")
        if self.nms_iou_threshold is not None and (
                not checks.is_real(self.nms_iou_threshold) or not 0 <= self.nms_iou_threshold <= 1):
            _config_error("nms_iou_threshold", self.nms_iou_threshold,
                          "must be None (off) or in [0, 1]")
        if (not checks.is_real(self.support_rescoring) or not math.isfinite(self.support_rescoring)
                or self.support_rescoring < 0):
            _config_error("support_rescoring", self.support_rescoring,
                          "must be a finite number >= 0 (0: off)")
        self.support_rescoring = float(self.support_rescoring)
        if self.support_rescoring > 0 and self.nms_iou_threshold is None:
            _config_error("support_rescoring", self.support_rescoring,
                          "counts suppressed duplicates: set nms_iou_threshold too")


def _config_error(field: str, value, why: str) -> None:
    raise ValueError(f"InferenceConfig.{field}={value!r}: {why}")
