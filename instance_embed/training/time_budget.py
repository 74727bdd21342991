"""Fitting a training run into a time budget on the machine at hand.

A run with `TrainConfig.time_budget_minutes` times steps `[PROBE_FIRST_STEP,
PROBE_FIRST_STEP + PROBE_STEPS)` (the first steps carry tracing and warm-up, and a
shorter window misjudges the speed of a shared machine), then plans how many
steps fit (`plan_steps`) and revises the plan every `log_every` steps through the first
half of the run, as a shared machine's speed drifts. A shorter plan compresses every
schedule counted in steps by the same factor (the trainer reads the schedules at
`step * train_steps / planned`), so the shorter run follows the whole schedule.
"""

from __future__ import annotations

import math
import time

PROBE_FIRST_STEP = 10
PROBE_STEPS = 50
# Planned step counts are rounded down to a multiple of this (above it), so that runs
# on one machine usually get the same plan despite timing noise.
PLAN_MULTIPLE = 50
# The clock of the time budget (tests replace it).
clock = time.perf_counter


def plan_steps(train_steps: int, step: int, elapsed_s: float, seconds_per_step: float,
               budget_s: float, multiple: int = PLAN_MULTIPLE) -> int:
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


class StepPlanner:
    """Revises a run's planned length from the speed measured as it trains.

    Args:
      train_steps: the steps the run asks for.
      budget_minutes: the time budget.
      log_every: steps between revisions after the probe.
      start_time: `clock()` when the run started.
      agree: `agree([elapsed, seconds_per_step]) -> the same values on every worker`
        (the mean over workers in a multi-worker run), so that all plan alike.
    """

    def __init__(self, train_steps: int, budget_minutes: float, log_every: int,
                 start_time: float, agree):
        self.train_steps = train_steps
        self.budget_s = 60.0 * budget_minutes
        self.log_every = log_every
        self.start_time = start_time
        self.agree = agree
        self.probe_start = None
        self.active = train_steps > PROBE_FIRST_STEP + PROBE_STEPS

    def after_step(self, step: int, planned: int) -> tuple[int, str | None] | None:
        """Called after each step while the plan may change.

        Args:
          step: steps done.
          planned: the current plan.

        Returns:
          None when nothing was measured at this step, else `(new plan, a message to
          log or None)`. Planning stops once the run is past half of its plan.
        """
        probe_end = PROBE_FIRST_STEP + PROBE_STEPS
        if not self.active:
            return None
        if step == PROBE_FIRST_STEP:
            self.probe_start = clock()
            return None
        if step < probe_end or (step > probe_end and step % self.log_every):
            return None
        now = clock()
        elapsed, seconds_per_step = self.agree(
            [now - self.start_time, (now - self.probe_start) / (step - PROBE_FIRST_STEP)])
        new_plan = plan_steps(self.train_steps, step, elapsed, seconds_per_step, self.budget_s)
        message = None
        if step == probe_end or new_plan != planned:
            fits = (f"all {self.train_steps} steps fit" if new_plan == self.train_steps else
                    f"planning {new_plan} of the {self.train_steps} steps, every schedule "
                    f"compressed {self.train_steps / new_plan:.2f}x")
            message = (f"Time budget {self.budget_s / 60:g} min: {seconds_per_step:.3f} s per "
                       f"step over steps {PROBE_FIRST_STEP}-{step}, {elapsed:.0f} s spent: "
                       f"{fits}.")
        self.active = step < new_plan // 2
        return new_plan, message
