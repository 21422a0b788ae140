"""The early-stopping rule and the schedule it ends, on their own (the worker's run of them is in
tests/test_train.py)."""

from __future__ import annotations

import pytest

from labtune.recipe import TrainConfig
from labtune.training.early_stopping import LOSS_GAIN, StoppableSchedule, Stopping, eval_due


def test_nothing_answered_yet_is_no_plateau_while_the_dev_loss_falls():
    stopping = Stopping(patience=2, threshold=0.0)
    for step, loss in ((10, 3.0), (20, 2.0), (30, 1.5), (40, 1.2)):
        stopping.record(step, 0, 40, loss)
        assert not stopping.plateaued()
    stopping.record(50, 0, 40, 1.2 * (1 - LOSS_GAIN / 2))  # less than a 1% fall: a miss, but the best loss
    stopping.record(60, 0, 40, 1.3)
    assert stopping.plateaued() and stopping.best_step == 50


def test_once_questions_are_answered_a_gain_is_accuracy_above_the_threshold():
    stopping = Stopping(patience=2, threshold=0.05)
    for step, correct in ((10, 0), (20, 10), (30, 30), (40, 31), (50, 30)):
        stopping.record(step, correct, 40, 1.0 / step)
    assert stopping.plateaued()  # 31/40 is not 5 points above 30/40; 30/40 is below
    assert (stopping.best_step, stopping.best) == (40, 31 / 40)  # the most accurate, not the last
    stopping.stopped_at = 50
    assert not stopping.plateaued()  # it ends the stable phase once


def test_a_tie_in_accuracy_goes_to_the_lower_dev_loss():
    stopping = Stopping(patience=3, threshold=0.0)
    assert stopping.record(10, 20, 40, 0.9)
    assert stopping.record(20, 20, 40, 0.5)
    assert not stopping.record(30, 20, 40, 0.7)
    assert stopping.best_step == 20


def test_the_decay_starts_where_training_plateaus_and_is_a_fifth_of_the_run_or_the_cap_s_last_fifth():
    schedule = StoppableSchedule(warmup=10, total=1000)
    assert schedule.factor(0) == pytest.approx(0.1) and schedule.factor(500) == 1.0
    end = schedule.decay_now(400)
    assert end == 500 and (end - 400) / end == pytest.approx(0.2)
    assert schedule.factor(400) == 1.0 and schedule.factor(450) == pytest.approx(0.5) and schedule.factor(500) == 0.0
    assert all(schedule.factor(s) >= schedule.factor(s + 1) for s in range(400, 500))
    planned = StoppableSchedule(warmup=10, total=1000)  # no plateau: a WSD run over the whole cap
    assert planned.factor(799) == 1.0 and planned.factor(900) == pytest.approx(0.5) and planned.factor(1000) == 0.0
    assert planned.decay_now(950) == 1000  # a plateau inside the planned decay changes nothing


def test_evaluations_fall_every_eval_steps_or_epoch_and_after_the_last_step():
    steps = TrainConfig(eval_strategy="steps", eval_steps=25)
    assert [s for s in range(1, 91) if eval_due(steps, s, 40, 90)] == [25, 50, 75, 90]
    epoch = TrainConfig(eval_strategy="epoch")
    assert [s for s in range(1, 101) if eval_due(epoch, s, 40, 100)] == [40, 80, 100]
    assert not any(eval_due(TrainConfig(), s, 40, 100) for s in range(1, 101))
