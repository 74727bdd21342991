"""The total training loss, `L = L_e + lambda(step) * L_cls`, from model outputs and a batch.

Typical use in a training step:

```python
loss_fn = InstanceLoss(LossConfig(cls_warmup_steps=500, cls_ramp_steps=500), taus)
outputs = model(batch["image"], training=True)
values = loss_fn(outputs, batch, step=step, seed=tf.stack([run_seed, step]))
values["total"]  # L_e + lambda(step) * L_cls
```

Everything works at the resolution of the network's heads `[h, w]`: the label map is
brought there by nearest neighbour, points are sampled there, and the masks grown from
them to build classification targets live there. All functions are pure tensor code
with static output shapes, so they run eagerly, in `tf.function`, under XLA and in any
`tf.distribute` replica context. Inputs in bfloat16/float16 are cast to float32 before
any arithmetic.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import tensorflow as tf

from instance_embed.losses.classification import classification_loss_per_image
from instance_embed.losses.classification import classification_targets
from instance_embed.losses.classification import cls_loss_weight
from instance_embed.losses.classification import semantic_targets
from instance_embed.losses.config import LossConfig
from instance_embed.losses.embedding import embedding_loss_per_image
from instance_embed.losses.sampling import gather_points
from instance_embed.losses.sampling import labels_at_resolution
from instance_embed.losses.sampling import sample_points
from instance_embed.model.config import PAPER_TAUS
from instance_embed.ops import checks


class InstanceLoss:
    """Total training loss `L = L_e + lambda(step) * L_cls` from model outputs and a batch.

    Args:
      config: a `LossConfig` (None = defaults).
      taus: the model's similarity thresholds (`ModelConfig.taus`), one per slice of the
        classification head.
      global_batch_reduction: False (default): the losses are means over this replica's
        images (average them over replicas, e.g. divide by `num_replicas_in_sync` before
        summing gradients). True: each is this replica's share of the global-batch mean
        (`global_batch_mean`; the replicas' values sum to the mean over all valid images).

    Call arguments:
      outputs: {"embeddings": float [B, h, w, d], "class_logits": float [B, h, w, T, C + 1]}.
      batch: {"instances": int [B, S, S], "instance_classes": int [B, M],
        "instance_valid": bool [B, M], ...} (extra keys ignored).
      step: int scalar, the optimizer step (drives lambda).
      seed: int32/int64 [2] or [B, 2] (one per image), seed of the point sampling.

    Returns:
      A dict of float32 scalars "total", "embedding", "classification", "cls_weight",
      and per-image vectors "embedding_per_image" float32 [B], "embedding_valid" bool [B],
      "classification_per_image" float32 [B], "classification_valid" bool [B].
    """

    def __init__(self, config: LossConfig | None = None,
                 taus: Sequence[float] = PAPER_TAUS, global_batch_reduction: bool = False):
        self.config = config if config is not None else LossConfig()
        if not isinstance(self.config, LossConfig):
            raise TypeError(f"config must be a LossConfig, got {type(self.config).__name__}")
        self.taus = checks.check_taus(taus)
        self.global_batch_reduction = bool(global_batch_reduction)

    def __call__(self, outputs: Mapping[str, tf.Tensor], batch: Mapping[str, tf.Tensor],
                 step: tf.Tensor | int, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        config = self.config
        checks.require_keys(outputs, ("embeddings", "class_logits"), "outputs")
        checks.require_keys(batch, ("instances", "instance_classes", "instance_valid"), "batch")
        embeddings = tf.cast(outputs["embeddings"], tf.float32)
        logits = tf.cast(outputs["class_logits"], tf.float32)
        checks.check_rank(embeddings, 'outputs["embeddings"]', 4)
        checks.check_rank(logits, 'outputs["class_logits"]', 5)
        num_taus = logits.shape[3]
        if num_taus is not None and num_taus != len(self.taus):
            raise ValueError(f'outputs["class_logits"] has {num_taus} thresholds, but '
                             f"taus has {len(self.taus)}: {self.taus}")
        size = (checks.static_dim(embeddings, 1, 'outputs["embeddings"]'),
                checks.static_dim(embeddings, 2, 'outputs["embeddings"]'))

        labels = labels_at_resolution(batch["instances"], size)
        points = sample_points(labels, batch["instance_valid"], config.points_per_instance,
                               seed, config.instance_size_weighting)
        indices, ids = points["point_indices"], points["point_instance_ids"]

        embedding_losses, embedding_valid = embedding_loss_per_image(
            gather_points(embeddings, indices), ids, points["point_weights"])
        targets = classification_targets(
            embeddings, labels, batch["instance_classes"], batch["instance_valid"],
            indices, ids, self.taus, config.cls_iou_threshold)
        point_logits = gather_points(logits, indices)
        cls_losses, cls_valid = classification_loss_per_image(point_logits, targets, ids >= 0)

        reduce = global_batch_mean if self.global_batch_reduction else masked_mean
        embedding = reduce(embedding_losses, embedding_valid)
        classification = reduce(cls_losses, cls_valid)
        weight = cls_loss_weight(step, config)
        total = embedding + weight * classification
        extra = {}
        if config.cls_semantic_warmup:
            semantic_losses, _ = classification_loss_per_image(
                point_logits, semantic_targets(ids, batch["instance_classes"],
                                               len(self.taus)), ids >= 0)
            extra["semantic"] = reduce(semantic_losses, cls_valid)
            total += (config.cls_weight_max - weight) * extra["semantic"]
        return {
            "total": total,
            "embedding": embedding,
            "classification": classification,
            "cls_weight": weight,
            **extra,
            "embedding_per_image": embedding_losses,
            "embedding_valid": embedding_valid,
            "classification_per_image": cls_losses,
            "classification_valid": cls_valid,
        }


def masked_mean(values: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    """Mean of `values [batch]` over `valid [batch]` entries; 0.0 when none is valid."""
    valid = tf.cast(valid, tf.float32)
    return tf.reduce_sum(tf.cast(values, tf.float32) * valid) / tf.maximum(
        tf.reduce_sum(valid), 1.0)


def global_batch_mean(values: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    """This replica's share of the mean of `values` over the valid images of the global batch.

    The denominator is the number of valid images summed over all replicas of the
    current `tf.distribute` replica context, so the sum of the replicas' results is the
    global-batch mean (what an optimizer that sums gradients across replicas needs).
    Without a strategy (or in cross-replica context) it is `masked_mean`.

    Args:
      values: float [batch] per-image losses (this replica's images).
      valid: bool [batch].

    Returns:
      float32 scalar.
    """
    valid = tf.cast(valid, tf.float32)
    local_sum = tf.reduce_sum(tf.cast(values, tf.float32) * valid)
    count = tf.reduce_sum(valid)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        count = context.all_reduce(tf.distribute.ReduceOp.SUM, count)
    return local_sum / tf.maximum(count, 1.0)
