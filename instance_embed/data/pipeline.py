"""`tf.data` input pipeline: augmented training batches of static shape.

Training (`train_dataset`) turns any dataset of contract examples (see
`instance_embed.data.features`) into batches of static shape:

| key                | dtype, shape      | meaning                                          |
| ------------------ | ----------------- | ------------------------------------------------ |
| `image`            | float32 [B,S,S,3] | RGB in [0, 255], 0 where invented (not normalised) |
| `instances`        | int32 [B,S,S]     | -1 ignore, 0 background, 1..n (n <= M)           |
| `instance_classes` | int32 [B,M]       | class of instance i at index i - 1, 0 if invalid |
| `instance_valid`   | bool [B,M]        | index i - 1 holds instance i                     |
| `image_id`         | string [B]        | the example's id                                 |

Order of operations: select the contract keys -> optional in-memory cache (decoded
examples, before any randomness) -> shuffle -> repeat -> attach a per-example stateless
seed -> augment (`augment.augment`) and pack the instances (`pack_instances`) in a
parallel map -> batch (drop_remainder, for static shapes) -> prefetch.

Evaluation and prediction take whole images of any size (`inference.predict_images`
pads them for the network).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from instance_embed.data import augment as augment_lib
from instance_embed.data.features import CONTRACT_SIGNATURE

CONTRACT_KEYS = tuple(CONTRACT_SIGNATURE)


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """Configuration of the training input pipeline.

    Attributes:
      image_size: side S of the square training crops. The paper does not state its
        crop size; 512 covers most of a VOC image (at most 500 pixels a side) at the
        mean resize ratio. Must be a multiple of 32 (the model's largest stride).
      max_instances: M, instances kept per training image (the largest ones).
      augment: the augmentation of paper section 4.2.
      shuffle_buffer: examples in the shuffle buffer; <= 1 disables shuffling.
      cache: keep the decoded examples in memory after the first pass (before
        augmentation, so every epoch is still augmented afresh).
    """

    image_size: int = 512
    max_instances: int = 32
    augment: augment_lib.AugmentConfig = dataclasses.field(
        default_factory=augment_lib.AugmentConfig)
    shuffle_buffer: int = 1000
    cache: bool = False

    def __post_init__(self):
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError("InputConfig.image_size must be a positive multiple of 32, got "
                             f"{self.image_size}")
        if self.max_instances < 1:
            raise ValueError(f"InputConfig.max_instances must be >= 1, got {self.max_instances}")
        if not isinstance(self.augment, augment_lib.AugmentConfig):
            raise TypeError("InputConfig.augment must be an AugmentConfig, got "
                            f"{type(self.augment).__name__}")


def _check_examples(examples: tf.data.Dataset) -> None:
    """Raises ValueError naming the key when `examples` does not follow the contract."""
    spec = examples.element_spec
    if not isinstance(spec, dict):
        raise ValueError("examples must be a tf.data.Dataset of dicts with keys "
                         f"{CONTRACT_KEYS}, got elements of {spec}")
    for key, expected in CONTRACT_SIGNATURE.items():
        if key not in spec:
            raise ValueError(f"examples lack the key {key!r} (contract keys: {CONTRACT_KEYS})")
        got = spec[key]
        dtype, rank = expected.dtype, expected.shape.rank
        if got.dtype != dtype or (got.shape.rank is not None and got.shape.rank != rank):
            raise ValueError(f"examples[{key!r}] must be {dtype.name} of rank {rank}, got "
                             f"{got.dtype.name} of shape {got.shape}")


def pack_instances(instances: tf.Tensor, instance_classes: tf.Tensor,
                   max_instances: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Renumbers the instances present to 1..n, n <= max_instances, keeping the largest.

    Instances absent from `instances` (e.g. cut away by the crop) are dropped. When more
    than `max_instances` remain, the largest by pixel count are kept (ties: lower id
    first) and the others become -1 (ignore). Kept instances keep their relative order.
    Ids outside 1..N are not in the contract; they become -1 rather than a fake instance.

    Args:
      instances: int32 [height, width], -1 ignore, 0 background, 1..N.
      instance_classes: int32 [N], class of instance i at index i - 1.
      max_instances: M.

    Returns:
      instances: int32 [height, width], -1, 0, 1..n.
      instance_classes: int32 [M], class of new instance i at index i - 1, 0 beyond n.
      instance_valid: bool [M], True at indices 0..n-1.
    """
    num = tf.shape(instance_classes)[0]
    # Bin 0 collects -1 and out-of-contract ids, bin 1 background, bin i + 1 instance i.
    index = instances + 1
    index = tf.where((index >= 0) & (index <= num + 1), index, 0)
    areas = tf.math.bincount(index, minlength=num + 2, maxlength=num + 2,
                             dtype=tf.int32)[2:]
    rank = tf.math.invert_permutation(tf.argsort(-areas, stable=True))
    keep = (areas > 0) & (rank < max_instances)
    new_ids = tf.where(keep, tf.cumsum(tf.cast(keep, tf.int32)), -1)
    lookup = tf.concat([tf.constant([-1, 0], tf.int32), new_ids], axis=0)
    packed = tf.gather(lookup, index)
    classes = tf.boolean_mask(instance_classes, keep)
    count = tf.shape(classes)[0]
    classes = tf.pad(classes, [[0, max_instances - count]])
    classes = tf.ensure_shape(classes, [max_instances])
    valid = tf.range(max_instances) < count
    return packed, classes, valid


def _select(example: dict) -> dict:
    return {key: example[key] for key in CONTRACT_KEYS}


def _train_map_fn(config: InputConfig):
    """The per-example training transform: augment, then pack the instances."""
    size = (config.image_size, config.image_size)

    def fn(example, seed):
        image, instances = augment_lib.augment(example["image"], example["instances"], seed,
                                               size, config.augment)
        instances, classes, valid = pack_instances(instances, example["instance_classes"],
                                                   config.max_instances)
        return {
            "image": image,
            "instances": instances,
            "instance_classes": classes,
            "instance_valid": valid,
            "image_id": example["image_id"],
        }

    return fn


def train_dataset(examples: tf.data.Dataset, config: InputConfig, batch_size: int,
                  seed: int | None = None, repeat: bool = True,
                  input_context: tf.distribute.InputContext | None = None,
                  skip_batches: int = 0) -> tf.data.Dataset:
    """Augmented training batches of static shape (paper section 4.2).

    Deterministic when a seed is given: the shuffle order and
    every augmentation derive from it, and the parallel map keeps its order, so two
    datasets built with the same seed yield identical batches.

    Use with `tf.distribute`:
    - `strategy.experimental_distribute_dataset(train_dataset(ex, cfg, global_batch))`:
      batches are global and the strategy splits them.
    - `strategy.distribute_datasets_from_function(lambda ctx: train_dataset(ex, cfg,
      global_batch, seed, input_context=ctx))`: each input pipeline reads its own shard
      of `examples` and yields per-replica batches of
      `ctx.get_per_replica_batch_size(global_batch)`; its seed is offset by the pipeline
      id so shards are augmented independently.

    Args:
      examples: contract examples (`image` uint8 [H,W,3], `instances` int32 [H,W],
        `instance_classes` int32 [N], `image_id` string); other keys are dropped.
      config: sizes, augmentation, shuffle and cache settings.
      batch_size: examples per batch (the global batch size with `input_context`).
      seed: the seed of the shuffle order and of every augmentation (None:
        nondeterministic).
      repeat: repeat the examples forever (one pass when False; the last incomplete
        batch is dropped either way).
      input_context: given by `distribute_datasets_from_function`.
      skip_batches: start after this many batches of the stream, as a resumed run
        continues the stream it was on. Examples are skipped before augmentation, each
        one's augmentation depending only on its own seed, so skipping costs reading,
        not augmenting.

    Returns:
      Dataset of dicts: `image` float32 [B,S,S,3], `instances` int32 [B,S,S],
      `instance_classes` int32 [B,M], `instance_valid` bool [B,M], `image_id` string [B].

    Raises:
      ValueError: `examples` break the contract (the message names the key) or
        `batch_size` is not positive.
    """
    _check_examples(examples)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    deterministic = seed is not None
    dataset = examples.map(_select, num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=deterministic)
    if input_context is not None:
        dataset = dataset.shard(input_context.num_input_pipelines,
                                input_context.input_pipeline_id)
        batch_size = input_context.get_per_replica_batch_size(batch_size)
        if seed is not None:
            seed += input_context.input_pipeline_id << 32
    if config.cache:
        dataset = dataset.cache()
    if config.shuffle_buffer > 1:
        dataset = dataset.shuffle(config.shuffle_buffer, seed=seed,
                                  reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    # Pairs of random int64s, one stateless seed per example, from a seeded stream.
    seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
    dataset = tf.data.Dataset.zip(dataset, seeds)
    if skip_batches:
        dataset = dataset.skip(skip_batches * batch_size)
    dataset = dataset.map(_train_map_fn(config), num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=deterministic)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    # The pipeline is already sharded when built per input pipeline; otherwise only
    # element-wise (DATA) sharding applies, as the seed stream is not file-based.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF if input_context is not None
        else tf.data.experimental.AutoShardPolicy.DATA)
    return dataset.with_options(options)
