"""Learning-rate schedules and optimizers of the trainer.

The backbone trains at `backbone_lr_multiplier` x the heads' rate (paper 3.5), with its
own optimizer: a gradient multiplier would not do, as Adam is invariant to the scale of
the gradients.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from instance_embed import configs


class WarmupCosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak`, then cosine decay to `final_fraction * peak`.

    With `step_scale` (a scalar variable), the schedule is read at `step * step_scale`:
    a run planned to `train_steps / step_scale` steps follows the whole schedule.
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int,
                 final_fraction: float, decay: str = "cosine", step_scale=None):
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(int(total_steps), 1)
        self.final_fraction = float(final_fraction)
        self.decay = decay
        self.step_scale = step_scale

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if self.step_scale is not None:
            step = step * tf.cast(self.step_scale, tf.float32)
        warmup = tf.cast(self.warmup_steps, tf.float32)
        warm = self.peak * tf.minimum(1.0, (step + 1.0) / tf.maximum(warmup, 1.0))
        if self.decay == "constant":
            return warm
        span = tf.maximum(float(self.total_steps) - warmup, 1.0)
        progress = tf.clip_by_value((step - warmup) / span, 0.0, 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        decayed = self.peak * (self.final_fraction + (1.0 - self.final_fraction) * cosine)
        return tf.where(step < warmup, warm, decayed)

    def get_config(self):
        return dict(peak=self.peak, warmup_steps=self.warmup_steps,
                    total_steps=self.total_steps, final_fraction=self.final_fraction,
                    decay=self.decay)


class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`base(step) * factor`: the backbone's learning rate."""

    def __init__(self, base: keras.optimizers.schedules.LearningRateSchedule, factor: float):
        self.base = base
        self.factor = float(factor)

    def __call__(self, step):
        return self.base(step) * self.factor

    def get_config(self):
        return dict(base=self.base.get_config(), factor=self.factor)


def make_optimizer(schedule, train_config: configs.TrainConfig, loss_scaled: bool = False):
    """Adam (AdamW with `weight_decay`), clipped by global norm, optionally loss-scaled."""
    kwargs = dict(learning_rate=schedule)
    if train_config.gradient_clip_norm > 0:
        kwargs["global_clipnorm"] = train_config.gradient_clip_norm
    if train_config.weight_decay > 0:
        optimizer = keras.optimizers.AdamW(weight_decay=train_config.weight_decay, **kwargs)
    else:
        optimizer = keras.optimizers.Adam(**kwargs)
    if loss_scaled:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
