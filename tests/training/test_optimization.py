"""Tests of `instance_embed.training.optimization`: the learning-rate schedules."""

import numpy as np
import pytest

from instance_embed.training import optimization


def test_learning_rate_schedule_matches_formula():
    schedule = optimization.WarmupCosineSchedule(1e-3, warmup_steps=10, total_steps=110,
                                                 final_fraction=0.1)
    assert float(schedule(0)) == pytest.approx(1e-4)
    assert float(schedule(9)) == pytest.approx(1e-3)
    halfway = 0.1e-3 + 0.9e-3 * 0.5 * (1 + np.cos(np.pi * 0.5))
    assert float(schedule(60)) == pytest.approx(halfway, rel=1e-5)
    assert float(schedule(110)) == pytest.approx(1e-4, rel=1e-5)
    scaled = optimization.ScaledSchedule(schedule, 0.1)
    assert float(scaled(60)) == pytest.approx(0.1 * halfway, rel=1e-5)
