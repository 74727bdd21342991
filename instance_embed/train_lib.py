"""The training loop: any `tf.distribute` strategy, checkpoints and resume, TensorBoard.

`train(config, model_dir)` runs an `ExperimentConfig` to `config.train.train_steps`:

* the batches of `data.pipeline.train_dataset`, distributed with
  `strategy.distribute_datasets_from_function` (each input pipeline reads its own shard at
  the per-replica batch size);
* one `strategy.run` per step; each replica's loss is its share of the global-batch mean
  (`losses.InstanceLoss(global_batch_reduction=True)`), so the gradients that Keras'
  optimizer sums across replicas are those of the global-batch mean;
* two Adam(W) optimizers, the backbone's at `backbone_lr_multiplier` x the heads' learning
  rate (paper 3.5; a gradient multiplier would not do: Adam is invariant to gradient scale);
* `tf.train.CheckpointManager` in `model_dir/ckpt/` (model, both optimizers, step): a
  restarted run resumes from the last complete checkpoint;
* a non-finite loss stops the run with `TrainingDivergedError` before anything is saved,
  so the last good checkpoint stays the latest one;
* scalars every `log_every` steps, images and the embedding projector every
  `summary_every` steps (see `summaries.py`), evaluation every `eval_every` steps;
* with `time_budget_minutes`, a plan made after timing the first steps and revised every
  `log_every` steps through the first half of the run: fewer steps when `train_steps`
  would not fit, with the step-counted schedules compressed to match (`plan_steps`; the
  schedules read the step through `step_scale`).
"""

from __future__ import annotations

import math
import os
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from instance_embed import configs
from instance_embed import data as datasets
from instance_embed import eval_lib
from instance_embed import losses
from instance_embed import summaries
from instance_embed.data import pipeline
from instance_embed.model import build_model
from instance_embed.model.builder import split_trainable_variables


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class IncompatibleConfigError(ValueError):
    """A setting that cannot work with the strategy found at start-up; nothing has run.

    The message starts with the offending field, `name=value: why`.
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


# A run with a time budget times steps [_PROBE_FIRST_STEP, _PROBE_FIRST_STEP +
# _PROBE_STEPS) to plan its length: the first steps carry tracing and warm-up, and a
# shorter window misjudged the demo's speed by 20% on a shared 2-core VM.
_PROBE_FIRST_STEP = 10
_PROBE_STEPS = 50
# Planned step counts are rounded down to a multiple of this (above it), so that runs
# on one machine usually get the same plan despite timing noise.
_PLAN_MULTIPLE = 50
# The clock of the time budget (tests replace it).
_clock = time.perf_counter


def plan_steps(train_steps: int, step: int, elapsed_s: float, seconds_per_step: float,
               budget_s: float, multiple: int = _PLAN_MULTIPLE) -> int:
    """The number of steps a run can afford within a time budget.

    Args:
      train_steps: steps the run asks for; never exceeded.
      step: steps done so far.
      elapsed_s: seconds spent so far (start-up included).
      seconds_per_step: measured cost of one step.
      budget_s: seconds the whole run may take.
      multiple: an affordable count above it is rounded down to a multiple of it.

    Returns:
      `train_steps` if it fits, else the affordable count `step + (budget_s - elapsed_s)
      / seconds_per_step`, rounded down, and at least `step + 1`.
    """
    affordable = step + math.floor(max(budget_s - elapsed_s, 0.0) / seconds_per_step)
    if affordable >= train_steps:
        return train_steps
    if affordable > multiple:
        affordable -= affordable % multiple
    return max(affordable, step + 1)


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


def _make_optimizer(schedule, train_config: configs.TrainConfig, loss_scaled: bool = False):
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


def _validate_replicas(config: configs.ExperimentConfig, strategy) -> int:
    replicas = strategy.num_replicas_in_sync
    if config.train.batch_size % replicas:
        raise IncompatibleConfigError(
            f"batch_size={config.train.batch_size}: must be divisible by the number of "
            f"replicas ({replicas}) of strategy {config.train.strategy!r}")
    return config.train.batch_size // replicas


def _distributed_dataset(config: configs.ExperimentConfig, strategy, per_replica_batch: int,
                         seed: int):
    examples = datasets.load(
        config.dataset.name, config.dataset.train_split, data_dir=config.dataset.data_dir,
        manual_dir=config.dataset.manual_dir, config=config.dataset.builder_config)

    def dataset_fn(input_context: tf.distribute.InputContext):
        shard = examples.shard(input_context.num_input_pipelines,
                               input_context.input_pipeline_id)
        return pipeline.train_dataset(
            shard, config.input, batch_size=per_replica_batch,
            seed=seed + 7919 * input_context.input_pipeline_id)

    return strategy.distribute_datasets_from_function(dataset_fn)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _agreed_mean(strategy, values) -> list[float]:
    """The mean over replicas (and workers) of `values`, the same on every worker."""
    if strategy.num_replicas_in_sync == 1:
        return [float(v) for v in values]
    local = tf.constant(values, tf.float32)

    @tf.function
    def mean():
        return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.MEAN, local))

    return [float(v) for v in strategy.experimental_local_results(mean())[0].numpy()]


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0)


def train(config: configs.ExperimentConfig, model_dir: str,
          stop_after_steps: int | None = None) -> dict:
    """Trains (or resumes) a run; returns the final losses and, if evaluated, metrics.

    Args:
      config: the run's configuration.
      model_dir: run directory (created if missing; resumed if it holds checkpoints).
      stop_after_steps: leave after this many steps of this call (checkpointing first),
        as a preempted job would; the schedule still runs to `config.train.train_steps`.
    """
    tc = config.train
    clock_start = _clock()
    strategy = make_strategy(tc.strategy, tc.tpu)
    per_replica_batch = _validate_replicas(config, strategy)
    chief = _is_chief(strategy)
    # Non-chief workers write to their own scratch directory: multi-worker saving needs
    # every worker to save, but only the chief's files are the run's.
    write_dir = model_dir if chief else os.path.join(
        model_dir, "workers", f"worker_{strategy.cluster_resolver.task_id}")
    if chief:
        config.save(model_dir)

    keras.utils.set_random_seed(tc.seed)
    # A resumed run takes every weight from its checkpoint, so it does not need (or
    # read) the pretrained backbone weights, which may be gone by then.
    resuming = tf.train.latest_checkpoint(os.path.join(write_dir, "ckpt")) is not None
    with strategy.scope():
        try:
            model = build_model(config.model, load_backbone_weights=not resuming)
        except (FileNotFoundError, ValueError) as e:
            # Weights that are missing or of another network, a layer name that is not
            # the backbone's: reported as a bad setting, before anything is trained.
            field = ("freeze_backbone_until" if "freeze_backbone_until" in str(e)
                     else "backbone_weights")
            raise IncompatibleConfigError(
                f"{field}={getattr(config.model, field)!r}: {e}") from None
        # Planned steps (0: no plan, the run is `train_steps` long) and the factor that
        # maps a step of the plan onto the schedules' step (train_steps / planned).
        planned_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="planned_steps")
        step_scale = tf.Variable(1.0, dtype=tf.float32, trainable=False, name="step_scale")
        schedule = WarmupCosineSchedule(tc.learning_rate, tc.warmup_steps, tc.train_steps,
                                        tc.final_lr_fraction, tc.decay, step_scale=step_scale)
        # float16 gradients underflow without loss scaling (bfloat16 has float32's
        # range). One dynamic scale serves both optimizers: the head optimizer's.
        scaled = config.model.mixed_precision == "mixed_float16"
        head_optimizer = _make_optimizer(schedule, tc, loss_scaled=scaled)
        backbone_optimizer = _make_optimizer(
            ScaledSchedule(schedule, tc.backbone_lr_multiplier), tc)
        backbone_vars, head_vars = split_trainable_variables(model, config.model)
        train_backbone = tc.backbone_lr_multiplier > 0 and bool(backbone_vars)
        head_optimizer.build(head_vars)
        if train_backbone:
            backbone_optimizer.build(backbone_vars)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    loss_fn = losses.InstanceLoss(config.loss, global_batch_reduction=True)

    checkpoint = _make_checkpoint(model, head_optimizer, backbone_optimizer, step,
                                  planned_steps)
    manager = tf.train.CheckpointManager(
        checkpoint, os.path.join(write_dir, "ckpt"), max_to_keep=tc.max_checkpoints,
        step_counter=step)
    if manager.latest_checkpoint:
        restorable = checkpoint
        if not tf.train.load_checkpoint(manager.latest_checkpoint).has_tensor(
                "planned_steps/.ATTRIBUTES/VARIABLE_VALUE"):
            # Written before time budgets existed: everything else, and no plan.
            restorable = _make_checkpoint(model, head_optimizer, backbone_optimizer, step)
        restorable.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        logging.info("Resumed from %s at step %d", manager.latest_checkpoint, int(step.numpy()))
    start_step = int(step.numpy())
    total_steps = tc.train_steps
    if 0 < int(planned_steps.numpy()) < tc.train_steps:
        total_steps = int(planned_steps.numpy())
        step_scale.assign(tc.train_steps / total_steps)
        logging.info("Keeping the checkpointed plan of %d steps (of train_steps=%d).",
                     total_steps, tc.train_steps)
    probe_end = _PROBE_FIRST_STEP + _PROBE_STEPS
    planning = (tc.time_budget_minutes is not None and tc.train_steps > probe_end
                and int(planned_steps.numpy()) == 0)
    if planning and start_step > 0:
        logging.warning("time_budget_minutes=%g is ignored: a budget is planned when a run "
                        "starts, and this one resumes at step %d without a plan.",
                        tc.time_budget_minutes, start_step)
        planning = False
    if start_step >= total_steps:
        logging.info("Already at step %d >= %d: nothing to train.", start_step, total_steps)

    # A resumed run draws a fresh augmentation stream rather than replaying the first one.
    dataset = _distributed_dataset(config, strategy, per_replica_batch,
                                   seed=tc.seed + 1000003 * start_step)
    iterator = iter(dataset)

    def replica_step(batch):
        # One sampling seed per image, from its position in the global batch: a mirrored
        # run samples the points a single device would.
        replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
        first = tf.cast(replica_id * per_replica_batch, tf.int64)
        image_index = step * tc.batch_size + first + tf.range(per_replica_batch,
                                                              dtype=tf.int64)
        seed = tf.stack([tf.fill([per_replica_batch], tf.cast(tc.seed, tf.int64)),
                         image_index], axis=1)
        with tf.GradientTape() as tape:
            outputs = model(batch["image"], training=True)
            # The loss' warm-up and ramp follow the schedule's step (see `step_scale`).
            schedule_step = tf.cast(step, tf.float32) * step_scale
            loss_values = loss_fn(outputs, batch, step=schedule_step, seed=seed)
            total = loss_values["total"]
            if tc.debug_nan_at_step >= 0:
                # Added, not multiplied: the NaN must not reach other steps' gradients.
                total = total + tf.where(step == tc.debug_nan_at_step, np.nan, 0.0)
                loss_values = dict(loss_values, total=total)
            replica_loss = total
            if scaled:
                replica_loss = head_optimizer.scale_loss(replica_loss)
        variables = head_vars + (backbone_vars if train_backbone else [])
        grads = tape.gradient(replica_loss, variables)
        head_grads, backbone_grads = grads[:len(head_vars)], grads[len(head_vars):]
        if scaled and train_backbone:
            # The head optimizer unscales its gradients and skips steps whose gradients
            # are not finite, shrinking the scale; the backbone's follow the same scale,
            # and a non-finite backbone gradient makes the head optimizer skip too.
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            scale = tf.cast(head_optimizer.dynamic_scale, tf.float32)
            backbone_grads = [tf.where(finite, g / scale, tf.zeros_like(g))
                              for g in backbone_grads]
            head_grads = [tf.where(finite, g, np.inf) for g in head_grads]
        head_optimizer.apply_gradients(zip(head_grads, head_vars))
        if train_backbone:
            backbone_optimizer.apply_gradients(zip(backbone_grads, backbone_vars))
        return {k: v for k, v in loss_values.items() if v.shape.rank == 0}

    @tf.function
    def train_step(iterator):
        per_replica = strategy.run(replica_step, args=(next(iterator),))
        step.assign_add(1)
        # Each replica holds its share of the global mean: the sum is the mean.
        return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN if k == "cls_weight"
                                   else tf.distribute.ReduceOp.SUM, v, axis=None)
                for k, v in per_replica.items()}

    train_writer = tf.summary.create_file_writer(os.path.join(write_dir, "train"))
    eval_writer = tf.summary.create_file_writer(os.path.join(write_dir, "eval"))
    pictures = None
    last = {}
    metrics = {}
    window_start, window_steps = time.perf_counter(), 0
    run_start = time.perf_counter()

    def end_of_call():
        return total_steps if stop_after_steps is None else min(
            total_steps, start_step + stop_after_steps)

    end_step = end_of_call()
    probe_start = None
    while int(step.numpy()) < end_step:
        values = train_step(iterator)
        current = int(step.numpy())
        if planning and current == _PROBE_FIRST_STEP:
            probe_start = _clock()
        elif planning and (current == probe_end or (
                current > probe_end and current % tc.log_every == 0)):
            now = _clock()
            # Every worker plans from the same (mean) timings, so all plan alike.
            elapsed, seconds_per_step = _agreed_mean(strategy, [
                now - clock_start, (now - probe_start) / (current - _PROBE_FIRST_STEP)])
            previous = total_steps
            total_steps = plan_steps(tc.train_steps, current, elapsed, seconds_per_step,
                                     60.0 * tc.time_budget_minutes)
            planned_steps.assign(total_steps)
            step_scale.assign(tc.train_steps / total_steps)
            end_step = end_of_call()
            if current == probe_end or total_steps != previous:
                logging.info(
                    "Time budget %g min: %.3f s per step over steps %d-%d, %.0f s spent: "
                    "%s.", tc.time_budget_minutes, seconds_per_step, _PROBE_FIRST_STEP,
                    current, elapsed,
                    f"all {tc.train_steps} steps fit" if total_steps == tc.train_steps else
                    f"planning {total_steps} of the {tc.train_steps} steps, every schedule "
                    f"compressed {tc.train_steps / total_steps:.2f}x")
            # The plan follows the measured speed (a shared machine's drifts by 20%)
            # through the first half of the run, then stays.
            planning = current < total_steps // 2
        last = {k: float(v) for k, v in values.items()}
        if not all(math.isfinite(v) for v in last.values()):
            raise TrainingDivergedError(
                f"Loss became non-finite at step {current} ({last}); stopping without "
                f"saving. The last good checkpoint is {manager.latest_checkpoint}. "
                "Try a lower --learning_rate or check the input data.")
        window_steps += 1
        if current % tc.log_every == 0 or current == total_steps:
            elapsed = time.perf_counter() - window_start
            images_per_s = window_steps * tc.batch_size / max(elapsed, 1e-9)
            lr = float(schedule(current - 1))
            remaining = (total_steps - current) * elapsed / max(window_steps, 1)
            logging.info(
                "step %d/%d | loss %.4f (embedding %.4f, classification %.4f, lambda %.3f%s)"
                " | lr %.2e | %.1f img/s | ETA %s", current, total_steps, last["total"],
                last["embedding"], last["classification"], last["cls_weight"],
                f", semantic {last['semantic']:.4f}" if "semantic" in last else "", lr,
                images_per_s, _format_eta(remaining))
            with train_writer.as_default(step=current):
                for key, value in last.items():
                    tf.summary.scalar(f"loss/{key}" if key != "cls_weight" else "lambda",
                                      value)
                tf.summary.scalar("learning_rate", lr)
                tf.summary.scalar("images_per_second", images_per_s)
            window_start, window_steps = time.perf_counter(), 0
        if chief and (current % tc.summary_every == 0 or current == total_steps):
            if pictures is None:
                pictures = summaries.TrainingPictures(model, config)
            pictures.write_images(train_writer, current)
            pictures.write_projector(os.path.join(write_dir, "projector"))
        if current % tc.checkpoint_every == 0 or current == end_step:
            manager.save(checkpoint_number=current)
        if tc.eval_every and current % tc.eval_every == 0 and current < total_steps:
            metrics = _evaluate(model, config, eval_writer, current, write_dir, chief)

    if manager.latest_checkpoint is None or int(step.numpy()) > _checkpoint_step(manager):
        manager.save(checkpoint_number=int(step.numpy()))
    if int(step.numpy()) < total_steps:
        logging.info("Stopped at step %d of %d; run again to resume.", int(step.numpy()),
                     total_steps)
        return {"step": int(step.numpy()), "losses": last, "metrics": metrics}
    if tc.eval_at_end and chief and not (
            metrics and metrics.get("step") == int(step.numpy())):
        metrics = _evaluate(model, config, eval_writer, int(step.numpy()), write_dir, chief)
    train_writer.flush()
    eval_writer.flush()
    logging.info("Training finished at step %d in %s.", int(step.numpy()),
                 _format_eta(time.perf_counter() - run_start))
    return {"step": int(step.numpy()), "losses": last, "metrics": metrics}


def _make_checkpoint(model, head_optimizer, backbone_optimizer, step,
                     planned_steps=None) -> tf.train.Checkpoint:
    """The training checkpoint; `planned_steps` (a time budget's plan) when given."""
    objects = dict(model=model, head_optimizer=head_optimizer,
                   backbone_optimizer=backbone_optimizer, step=step)
    if planned_steps is not None:
        objects["planned_steps"] = planned_steps
    return tf.train.Checkpoint(**objects)


def _checkpoint_step(manager: tf.train.CheckpointManager) -> int:
    return int(manager.latest_checkpoint.rsplit("-", 1)[-1])


def _evaluate(model, config, writer, step: int, model_dir: str, chief: bool) -> dict:
    if not chief:
        return {}
    evaluator = eval_lib.evaluate_model(model, config,
                                        max_examples=config.train.eval_max_examples)
    result = eval_lib.write_outputs(evaluator, model_dir)
    with writer.as_default(step=step):
        for key, value in result.items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                tf.summary.scalar(f"metrics/{key}", value)
    return dict(result, step=step)
