"""Training stopped by a signal: noted, so that the run checkpoints at a step boundary.

- `StopSignals`: SIGTERM (a preempted VM, a scheduler) or SIGINT (Ctrl-C) is noted
  instead of acted on; the trainer ends the step under way, checkpoints and returns.
- `WorkerPreemption`: on multi-worker, a SIGTERM to any worker makes every worker
  checkpoint at the same step (`tf.distribute.experimental.PreemptionCheckpointHandler`
  through the cluster's coordination service), then return.
"""

from __future__ import annotations

import signal
import threading

import tensorflow as tf


class _Preempted(Exception):
    """Raised by `WorkerPreemption`'s exit function, after the cluster's checkpoint."""


class WorkerPreemption:
    """SIGTERM on any worker of a multi-worker run: every worker checkpoints at one step.

    `tf.distribute.experimental.PreemptionCheckpointHandler` watches for SIGTERM on
    each worker and agrees on the step to save at through the cluster's coordination
    service. Instead of exiting the process there, its exit function returns control,
    so that the run closes its files and reports like a single-worker one. A context
    manager: the SIGTERM handler and the watcher threads go when it closes.

    The handler adds its run counter to the run's checkpoint and restores the latest
    checkpoint once more when it starts (the same values). On Google Compute Engine it
    watches the metadata server instead of SIGTERM (CPU VMs: not at all); see
    docs/robustness.md.
    """

    def __init__(self, strategy, manager: tf.train.CheckpointManager):
        self._strategy = strategy
        self._manager = manager
        self._handler = None
        self._previous = None

    def __enter__(self) -> "WorkerPreemption":
        def leave():
            raise _Preempted()

        self._previous = signal.getsignal(signal.SIGTERM)
        self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            self._strategy.cluster_resolver, self._manager,
            termination_config=tf.distribute.experimental.TerminationConfig(exit_fn=leave))
        return self

    def checkpoint_if_preempted(self, step: int) -> bool:
        """Called after every step; True once the cluster's checkpoint at `step` (the
        same on every worker) is written and the run should stop."""
        try:
            self._handler.save_checkpoint_if_preempted(checkpoint_number=step)
        except _Preempted:
            return True
        return False

    def __exit__(self, *exc_info) -> None:
        # TF offers no public close: the handler's __del__ stops its watcher threads,
        # but those threads keep it referenced, so it would never run.
        for stop in ("_stop_cluster_wise_termination_watcher_thread",
                     "_stop_poll_termination_signal_thread"):
            getattr(self._handler, stop, lambda: None)()
        self._handler = None
        signal.signal(signal.SIGTERM,
                      self._previous if self._previous is not None else signal.SIG_DFL)


class StopSignals:
    """A context in which the first SIGTERM or SIGINT is noted instead of acted on.

    `received` is the first signal (a `signal.Signals`), or None. A second signal acts as
    it would have without this context (Ctrl-C twice interrupts at once). Handlers are
    only installed from the main thread, where Python delivers signals.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.received = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        del frame
        self.received = signal.Signals(signum)
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc_info) -> None:
        self._restore()
