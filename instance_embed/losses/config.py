"""`LossConfig`: the settings of the two losses and of lambda's schedule.

The similarity thresholds are the model's (`ModelConfig.taus`): `InstanceLoss` takes
them from it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from instance_embed.ops import checks


@dataclasses.dataclass
class LossConfig:
    """Configuration of `InstanceLoss`.

    Attributes:
      points_per_instance: K, points sampled per instance (background counts as one).
      instance_size_weighting: weight each point by the inverse of its instance's size
        at the heads' resolution (the paper's choice); False = uniform weights.
      cls_iou_threshold: a mask grown from a seed is labelled with the class of its best
        matching ground-truth instance when their IoU exceeds this, else background.
      cls_warmup_steps: steps during which the classification loss weight is 0 (the
        paper first lets the embedding settle).
      cls_ramp_steps: steps over which the weight then rises linearly to
        `cls_weight_max` (0 = jump straight to it).
      cls_weight_max: final weight lambda of the classification loss (paper: 0.2).
      cls_semantic_warmup: not in the paper, off by default. The paper's targets (the
        class of the mask a seed grows) mean little while the embeddings are young, so
        the head idles through the warm-up. With this on, it learns each point's
        semantic class (its instance's class at every tau, 0 on the background) from
        step 0 with weight `cls_weight_max - lambda(step)`: all of it during the
        warm-up, handed over to the paper's targets as lambda ramps up, none after.
    """

    points_per_instance: int = 10
    instance_size_weighting: bool = True
    cls_iou_threshold: float = 0.5
    cls_warmup_steps: int = 1000
    cls_ramp_steps: int = 1000
    cls_weight_max: float = 0.2
    cls_semantic_warmup: bool = False

    def __post_init__(self):
        _require(checks.is_int(self.points_per_instance) and self.points_per_instance >= 1,
                 "points_per_instance", self.points_per_instance, "must be an int >= 1")
        _require(isinstance(self.instance_size_weighting, (bool, np.bool_)),
                 "instance_size_weighting", self.instance_size_weighting, "must be a bool")
        _require(checks.is_number(self.cls_iou_threshold) and 0.0 <= self.cls_iou_threshold < 1.0,
                 "cls_iou_threshold", self.cls_iou_threshold, "must be in [0, 1)")
        for name in ("cls_warmup_steps", "cls_ramp_steps"):
            value = getattr(self, name)
            _require(checks.is_int(value) and value >= 0, name, value, "must be an int >= 0")
        _require(checks.is_number(self.cls_weight_max) and self.cls_weight_max >= 0.0,
                 "cls_weight_max", self.cls_weight_max, "must be a number >= 0")
        _require(isinstance(self.cls_semantic_warmup, (bool, np.bool_)),
                 "cls_semantic_warmup", self.cls_semantic_warmup, "must be a bool")


def _require(ok: bool, field: str, value, why: str) -> None:
    if not ok:
        raise ValueError(f"LossConfig.{field}={value!r}: {why}")
