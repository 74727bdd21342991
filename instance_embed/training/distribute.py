"""`tf.distribute` helpers: strategies by name, the batch split, the chief, agreed values."""

from __future__ import annotations

import tensorflow as tf

from instance_embed import configs


class IncompatibleConfigError(ValueError):
    """A setting that cannot work with the strategy or model found at start-up; nothing
    has run. The message starts with the offending field, `name=value: why`.
    """


def make_strategy(name: str, tpu: str | None = None) -> tf.distribute.Strategy:
    """Returns the `tf.distribute` strategy called `name` (see `configs.STRATEGIES`)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker_mirrored":
        # Reads the cluster from TF_CONFIG.
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(
        f"strategy={name!r}: must be one of {', '.join(configs.STRATEGIES)}")


def per_replica_batch_size(batch_size: int, strategy, strategy_name: str) -> int:
    """The global `batch_size` split over the replicas of `strategy` (`strategy_name`,
    for the message).

    Raises:
      IncompatibleConfigError: if it does not split evenly.
    """
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise IncompatibleConfigError(
            f"batch_size={batch_size}: must be divisible by the number of replicas "
            f"({replicas}) of strategy {strategy_name!r}")
    return batch_size // replicas


def agreed_mean(strategy, values) -> list[float]:
    """The mean over replicas (and workers) of `values`, the same on every worker."""
    if strategy.num_replicas_in_sync == 1:
        return [float(v) for v in values]
    local = tf.constant(values, tf.float32)

    @tf.function
    def mean():
        return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.MEAN, local))

    return [float(v) for v in strategy.experimental_local_results(mean())[0].numpy()]


def is_chief(strategy) -> bool:
    """Whether this worker writes the run's files (the chief, or worker 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0)
