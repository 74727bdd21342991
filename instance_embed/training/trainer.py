"""The training loop: any `tf.distribute` strategy, checkpoints and resume, TensorBoard.

`train(config, model_dir)` runs an `ExperimentConfig` to `config.train.train_steps`:

* the batches of `data.pipeline.train_dataset`, distributed with
  `strategy.distribute_datasets_from_function` (each input pipeline reads its own shard at
  the per-replica batch size);
* one `strategy.run` per step; each replica's loss is its share of the global-batch mean
  (`InstanceLoss(global_batch_reduction=True)`), so the gradients that Keras' optimizer
  sums across replicas are those of the global-batch mean;
* two Adam(W) optimizers, the pretrained backbone's at `backbone_lr_multiplier` x the
  heads' learning rate (`optimization.py`);
* `tf.train.CheckpointManager` in `model_dir/ckpt/` (model, both optimizers, step, the
  time budget's plan): a restarted run resumes from the last complete checkpoint, and
  takes every weight from it (pretrained backbone weights are loaded only when a run
  starts);
* a non-finite loss stops the run with `TrainingDivergedError` before anything is saved,
  so the last good checkpoint stays the latest one;
* scalars every `log_every` steps, images and the embedding projector every
  `summary_every` steps (`summaries.py`), evaluation every `eval_every` steps;
* with `time_budget_minutes`, a plan revised from the measured speed
  (`time_budget.StepPlanner`); the schedules read the step through `step_scale`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from instance_embed import configs
from instance_embed import data as datasets
from instance_embed.data import pipeline
from instance_embed.evaluation import runner as evaluation_runner
from instance_embed.losses import InstanceLoss
from instance_embed.model import build_model
from instance_embed.model.builder import split_trainable_variables
from instance_embed.training import distribute
from instance_embed.training import signals
from instance_embed.training import optimization
from instance_embed.training import summaries
from instance_embed.training import time_budget
from instance_embed.training.checkpoints import CHECKPOINT_SUBDIR
from instance_embed.training.distribute import IncompatibleConfigError

__all__ = ["IncompatibleConfigError", "TrainingDivergedError", "train"]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class _Run:
    """What a training run holds: the model, its optimizers and the checkpointed state."""

    model: keras.Model
    schedule: optimization.WarmupCosineSchedule
    head_optimizer: keras.optimizers.Optimizer
    backbone_optimizer: keras.optimizers.Optimizer
    backbone_vars: list
    head_vars: list
    step: tf.Variable
    # Planned steps (0: no plan, the run is `train_steps` long) and the factor that maps
    # a step of the plan onto the schedules' step (train_steps / planned).
    planned_steps: tf.Variable
    step_scale: tf.Variable
    manager: tf.train.CheckpointManager


def _build_run(config: configs.ExperimentConfig, strategy, write_dir: str) -> _Run:
    """Builds the model and optimizers under `strategy` and restores the latest checkpoint."""
    tc = config.train
    ckpt_dir = os.path.join(write_dir, CHECKPOINT_SUBDIR)
    # A resumed run takes every weight from its checkpoint, so it does not need (or
    # read) the pretrained backbone weights, which may be gone by then.
    resuming = tf.train.latest_checkpoint(ckpt_dir) is not None
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
        planned_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="planned_steps")
        step_scale = tf.Variable(1.0, dtype=tf.float32, trainable=False, name="step_scale")
        schedule = optimization.WarmupCosineSchedule(
            tc.learning_rate, tc.warmup_steps, tc.train_steps, tc.final_lr_fraction, tc.decay,
            step_scale=step_scale)
        # float16 gradients underflow without loss scaling (bfloat16 has float32's
        # range). One dynamic scale serves both optimizers: the head optimizer's.
        head_optimizer = optimization.make_optimizer(
            schedule, tc, loss_scaled=config.model.mixed_precision == "mixed_float16")
        backbone_optimizer = optimization.make_optimizer(
            optimization.ScaledSchedule(schedule, tc.backbone_lr_multiplier), tc)
        backbone_vars, head_vars = split_trainable_variables(model, config.model)
        if tc.backbone_lr_multiplier == 0:
            backbone_vars = []
        head_optimizer.build(head_vars)
        if backbone_vars:
            backbone_optimizer.build(backbone_vars)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    checkpoint = tf.train.Checkpoint(model=model, head_optimizer=head_optimizer,
                                     backbone_optimizer=backbone_optimizer, step=step,
                                     planned_steps=planned_steps)
    manager = tf.train.CheckpointManager(checkpoint, ckpt_dir, max_to_keep=tc.max_checkpoints,
                                         step_counter=step)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        logging.info("Resumed from %s at step %d", manager.latest_checkpoint, int(step.numpy()))
    return _Run(model, schedule, head_optimizer, backbone_optimizer, backbone_vars, head_vars,
                step, planned_steps, step_scale, manager)


def _distributed_dataset(config: configs.ExperimentConfig, strategy, per_replica_batch: int,
                         seed: int, start_step: int):
    examples = datasets.load(
        config.dataset.name, config.dataset.train_split, data_dir=config.dataset.data_dir,
        manual_dir=config.dataset.manual_dir, config=config.dataset.builder_config)

    def dataset_fn(input_context: tf.distribute.InputContext):
        shard = examples.shard(input_context.num_input_pipelines,
                               input_context.input_pipeline_id)
        return pipeline.train_dataset(
            shard, config.input, batch_size=per_replica_batch,
            seed=seed + 7919 * input_context.input_pipeline_id, skip_batches=start_step)

    return strategy.distribute_datasets_from_function(dataset_fn)


def _make_train_step(run: _Run, config: configs.ExperimentConfig, strategy,
                     per_replica_batch: int):
    """The compiled step: one batch per replica, gradients, both optimizers, step += 1."""
    tc = config.train
    loss_fn = InstanceLoss(config.loss, config.model.taus, global_batch_reduction=True)
    scaled = config.model.mixed_precision == "mixed_float16"
    head_optimizer, backbone_optimizer = run.head_optimizer, run.backbone_optimizer
    head_vars, backbone_vars = run.head_vars, run.backbone_vars

    def replica_step(batch):
        # One sampling seed per image, from its position in the global batch: a mirrored
        # run samples the points a single device would.
        replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
        first = tf.cast(replica_id * per_replica_batch, tf.int64)
        image_index = run.step * tc.batch_size + first + tf.range(per_replica_batch,
                                                                  dtype=tf.int64)
        seed = tf.stack([tf.fill([per_replica_batch], tf.cast(tc.seed, tf.int64)),
                         image_index], axis=1)
        with tf.GradientTape() as tape:
            outputs = run.model(batch["image"], training=True)
            # The loss' warm-up and ramp follow the schedule's step (see `step_scale`).
            schedule_step = tf.cast(run.step, tf.float32) * run.step_scale
            loss_values = loss_fn(outputs, batch, step=schedule_step, seed=seed)
            replica_loss = loss_values["total"]
            if scaled:
                replica_loss = head_optimizer.scale_loss(replica_loss)
        grads = tape.gradient(replica_loss, head_vars + backbone_vars)
        head_grads, backbone_grads = grads[:len(head_vars)], grads[len(head_vars):]
        if scaled and backbone_vars:
            # The head optimizer unscales its gradients and skips steps whose gradients
            # are not finite, shrinking the scale; the backbone's follow the same scale,
            # and a non-finite backbone gradient makes the head optimizer skip too.
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            scale = tf.cast(head_optimizer.dynamic_scale, tf.float32)
            backbone_grads = [tf.where(finite, g / scale, tf.zeros_like(g))
                              for g in backbone_grads]
            head_grads = [tf.where(finite, g, np.inf) for g in head_grads]
        head_optimizer.apply_gradients(zip(head_grads, head_vars))
        if backbone_vars:
            backbone_optimizer.apply_gradients(zip(backbone_grads, backbone_vars))
        return {k: v for k, v in loss_values.items() if v.shape.rank == 0}

    @tf.function
    def train_step(iterator):
        per_replica = strategy.run(replica_step, args=(next(iterator),))
        run.step.assign_add(1)
        # Each replica holds its share of the global mean: the sum is the mean.
        return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN if k == "cls_weight"
                                   else tf.distribute.ReduceOp.SUM, v, axis=None)
                for k, v in per_replica.items()}

    return train_step


def train(config: configs.ExperimentConfig, model_dir: str,
          stop_after_steps: int | None = None,
          strategy: tf.distribute.Strategy | None = None) -> dict:
    """Trains (or resumes) a run; returns the final losses and, if evaluated, metrics.

    A SIGTERM or SIGINT received while training ends the current step, writes a
    checkpoint at it and returns with the signal under "signal" (multi-worker: a
    SIGTERM to any worker, and every worker checkpoints at the same step); called
    again, the run resumes there and continues the same data stream, so it ends with
    the weights of an uninterrupted run (given op determinism).

    Args:
      config: the run's configuration.
      model_dir: run directory (created if missing; resumed if it holds checkpoints).
      stop_after_steps: leave after this many steps of this call (checkpointing first),
        as a preempted job would; the schedule still runs to `config.train.train_steps`.
      strategy: the `tf.distribute` strategy to train under (default: the one named by
        `config.train.strategy`).

    Raises:
      IncompatibleConfigError: a setting that cannot work (nothing has been trained).
      TrainingDivergedError: the loss became NaN or Inf.
    """
    tc = config.train
    start_time = time_budget.clock()
    strategy = strategy or distribute.make_strategy(tc.strategy, tc.tpu)
    per_replica_batch = distribute.per_replica_batch_size(tc.batch_size, strategy, tc.strategy)
    chief = distribute.is_chief(strategy)
    # Non-chief workers write to their own scratch directory: multi-worker saving needs
    # every worker to save, but only the chief's files are the run's.
    write_dir = model_dir if chief else os.path.join(
        model_dir, "workers", f"worker_{strategy.cluster_resolver.task_id}")
    keras.utils.set_random_seed(tc.seed)
    run = _build_run(config, strategy, write_dir)
    if chief:
        config.save(model_dir)

    start_step = int(run.step.numpy())
    total_steps = tc.train_steps
    if 0 < int(run.planned_steps.numpy()) < tc.train_steps:
        total_steps = int(run.planned_steps.numpy())
        run.step_scale.assign(tc.train_steps / total_steps)
        logging.info("Keeping the checkpointed plan of %d steps (of train_steps=%d).",
                     total_steps, tc.train_steps)
    planner = None
    if tc.time_budget_minutes is not None and int(run.planned_steps.numpy()) == 0:
        if start_step > 0:
            logging.warning("time_budget_minutes=%g is ignored: a budget is planned when a "
                            "run starts, and this one resumes at step %d without a plan.",
                            tc.time_budget_minutes, start_step)
        else:
            planner = time_budget.StepPlanner(
                tc.train_steps, tc.time_budget_minutes, tc.log_every, start_time,
                lambda values: distribute.agreed_mean(strategy, values))
    if start_step >= total_steps:
        logging.info("Already at step %d >= %d: nothing to train.", start_step, total_steps)

    # A resumed run continues the stream where it stopped, so that an interrupted and
    # resumed run trains on the batches, and ends with the weights, of a straight one.
    iterator = iter(_distributed_dataset(config, strategy, per_replica_batch, seed=tc.seed,
                                         start_step=start_step))
    train_step = _make_train_step(run, config, strategy, per_replica_batch)
    train_writer = tf.summary.create_file_writer(os.path.join(write_dir, "train"))
    eval_writer = tf.summary.create_file_writer(os.path.join(write_dir, "eval"))
    pictures = None
    last, metrics = {}, {}
    window_start, window_steps = time.perf_counter(), 0
    run_start = time.perf_counter()

    def end_of_call():
        return total_steps if stop_after_steps is None else min(
            total_steps, start_step + stop_after_steps)

    end_step = end_of_call()
    # SIGTERM or SIGINT (a preempted VM, a scheduler, Ctrl-C) ends the step under way,
    # then the run checkpoints and returns. On multi-worker, one worker stopping alone
    # would leave the others waiting in a collective: a SIGTERM to any worker makes all
    # of them checkpoint at one step and return (signals.WorkerPreemption).
    multi_worker = tc.strategy == "multi_worker_mirrored"
    stop = signals.StopSignals(()) if multi_worker else signals.StopSignals()
    preemption = signals.WorkerPreemption(strategy, run.manager) if multi_worker else None
    with stop, preemption or contextlib.nullcontext():
        while int(run.step.numpy()) < end_step and stop.received is None:
            values = train_step(iterator)
            current = int(run.step.numpy())
            last = {k: float(v) for k, v in values.items()}
            if not all(math.isfinite(v) for v in last.values()):
                raise TrainingDivergedError(
                    f"Loss became non-finite at step {current} ({last}); stopping without "
                    f"saving. The last good checkpoint is {run.manager.latest_checkpoint}. "
                    "Try a lower --learning_rate or check the input data.")
            if preemption is not None and preemption.checkpoint_if_preempted(current):
                stop.received = signal.SIGTERM
                break  # the cluster's checkpoint at `current` is written
            if planner is not None and planner.active:
                revision = planner.after_step(current, total_steps)
                if revision is not None:
                    total_steps, message = revision
                    run.planned_steps.assign(total_steps)
                    run.step_scale.assign(tc.train_steps / total_steps)
                    end_step = end_of_call()
                    if message:
                        logging.info("%s", message)
            window_steps += 1
            if current % tc.log_every == 0 or current == total_steps:
                elapsed = time.perf_counter() - window_start
                _log_progress(run, tc, last, current, total_steps, window_steps, elapsed,
                              train_writer)
                window_start, window_steps = time.perf_counter(), 0
            if chief and (current % tc.summary_every == 0 or current == total_steps):
                if pictures is None:
                    pictures = summaries.TrainingPictures(run.model, config)
                pictures.write_images(train_writer, current)
                pictures.write_projector(os.path.join(write_dir, "projector"))
            if current % tc.checkpoint_every == 0 or current == end_step:
                run.manager.save(checkpoint_number=current)
            if (tc.eval_every and current % tc.eval_every == 0 and current < total_steps
                    and chief):
                metrics = _evaluate(run.model, config, eval_writer, current, write_dir)

    step = int(run.step.numpy())
    if run.manager.latest_checkpoint is None or step > _checkpoint_step(run.manager):
        run.manager.save(checkpoint_number=step)
    if stop.received is not None:
        train_writer.flush()
        eval_writer.flush()
        logging.warning("%s at step %d of %d: checkpoint %s written. Run the same command "
                        "again to resume.", stop.received.name, step, total_steps,
                        run.manager.latest_checkpoint)
        return {"step": step, "losses": last, "metrics": metrics, "signal": stop.received}
    if step < total_steps:
        logging.info("Stopped at step %d of %d; run again to resume.", step, total_steps)
        return {"step": step, "losses": last, "metrics": metrics}
    if tc.eval_at_end and chief and not (metrics and metrics.get("step") == step):
        metrics = _evaluate(run.model, config, eval_writer, step, write_dir)
    train_writer.flush()
    eval_writer.flush()
    logging.info("Training finished at step %d in %s, computing in %s.", step,
                 _format_duration(time.perf_counter() - run_start),
                 {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(
                     config.model.mixed_precision, "float32"))
    return {"step": step, "losses": last, "metrics": metrics}


def _log_progress(run: _Run, tc: configs.TrainConfig, last: dict, current: int,
                  total_steps: int, window_steps: int, elapsed: float, writer) -> None:
    """The console line (step, losses, learning rate, images/s, ETA) and the scalars."""
    images_per_s = window_steps * tc.batch_size / max(elapsed, 1e-9)
    lr = float(run.schedule(current - 1))
    remaining = (total_steps - current) * elapsed / max(window_steps, 1)
    logging.info(
        "step %d/%d | loss %.4f (embedding %.4f, classification %.4f, lambda %.3f%s)"
        " | lr %.2e | %.1f img/s | ETA %s", current, total_steps, last["total"],
        last["embedding"], last["classification"], last["cls_weight"],
        f", semantic {last['semantic']:.4f}" if "semantic" in last else "", lr,
        images_per_s, _format_duration(remaining))
    with writer.as_default(step=current):
        for key, value in last.items():
            tf.summary.scalar(f"loss/{key}" if key != "cls_weight" else "lambda", value)
        tf.summary.scalar("learning_rate", lr)
        tf.summary.scalar("images_per_second", images_per_s)


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _checkpoint_step(manager: tf.train.CheckpointManager) -> int:
    return int(manager.latest_checkpoint.rsplit("-", 1)[-1])


def _evaluate(model, config, writer, step: int, model_dir: str) -> dict:
    evaluator = evaluation_runner.evaluate_model(model, config,
                                                 max_examples=config.train.eval_max_examples)
    result = evaluation_runner.write_outputs(evaluator, model_dir)
    with writer.as_default(step=step):
        for key, value in result.items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                tf.summary.scalar(f"metrics/{key}", value)
    return dict(result, step=step)
