"""Tests of `instance_embed.training.time_budget` (its use by the trainer is tested in
test_trainer.py, with a clock the test controls)."""

from instance_embed.training import time_budget


def test_plan_steps_hand_worked_cases():
    # 35 steps done in 20 s, 0.5 s per step, 60 s budget: 35 + 40 / 0.5 = 115 -> 100.
    assert time_budget.plan_steps(200, 35, 20.0, 0.5, 60.0) == 100
    assert time_budget.plan_steps(200, 35, 20.0, 0.5, 60.0, multiple=1) == 115
    # Everything fits: the run keeps its train_steps, never more.
    assert time_budget.plan_steps(200, 35, 20.0, 0.5, 1000.0) == 200
    assert time_budget.plan_steps(115, 35, 20.0, 0.5, 60.0) == 115
    # Counts below the multiple are kept as they are.
    assert time_budget.plan_steps(200, 10, 5.0, 1.0, 45.0) == 50
    assert time_budget.plan_steps(200, 10, 5.0, 1.0, 44.0) == 49
    # Out of time already: the run ends after one more step.
    assert time_budget.plan_steps(200, 35, 90.0, 0.5, 60.0) == 36


def test_planner_probes_then_revises_until_half_way(monkeypatch):
    # Readings 5 s at step 10 and 30 s at step 60 (0.5 s per step, 30 s spent): a
    # 1.5-minute budget affords 60 + 60 / 0.5 = 180 steps, planned 150. At step 65 (40 s,
    # 35 s over 55 steps) it affords 65 + 50 / 0.636 = 143 -> 100, and step 65 is past half
    # of that plan: planning stops.
    readings = iter([5.0, 30.0, 40.0])
    monkeypatch.setattr(time_budget, "clock", lambda: next(readings))
    planner = time_budget.StepPlanner(400, 1.5, log_every=5, start_time=0.0,
                                      agree=lambda values: values)
    assert planner.after_step(5, 400) is None
    assert planner.after_step(10, 400) is None  # the probe starts
    assert planner.after_step(30, 400) is None
    plan, message = planner.after_step(60, 400)
    assert plan == 150 and "planning 150 of the 400 steps" in message and planner.active
    assert planner.after_step(63, plan) is None  # not a multiple of log_every
    plan, message = planner.after_step(65, plan)
    assert plan == 100 and "planning 100" in message and not planner.active


def test_short_runs_are_not_planned():
    planner = time_budget.StepPlanner(60, 1.0, log_every=5, start_time=0.0,
                                      agree=lambda values: values)
    assert not planner.active
