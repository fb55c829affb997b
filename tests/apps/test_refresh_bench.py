"""The refresh benchmark's schedule arithmetic and its digits-quality rows (``headpag/apps/benchmarks/refresh.py``)."""

from __future__ import annotations

import pytest

from headpag.apps.benchmarks import refresh as R


def test_guided_and_refresh_steps_follow_the_interval_rule():
    assert R.guided_steps(28, (0.01, 0.2)) == [1, 2, 3, 4, 5]  # 0/28 < 0.01, 6/28 >= 0.2
    assert R.refresh_steps(28, (0.01, 0.2), 2) == [1, 3, 5]
    assert R.refresh_steps(10, (0.0, 1.0), 4) == [0, 4, 8]
    assert R.refresh_steps(10, (0.5, 0.5), 2) == []


@pytest.mark.parametrize("refresh, expected", [(1, 1.5), (2, 1.25), (4, 1.125)])
def test_schedule_ratio(refresh, expected):
    # 8 steps all guided; a refreshing step costs 1.5 CFG steps: refresh k runs 8 / k of them
    assert R.schedule_ratio(1.5, 8, (0.0, 1.0), refresh) == pytest.approx(expected)


def test_digits_quality_rows():
    from headpag.apps.digits import DigitObjective, load_pipeline

    pipe = load_pipeline()
    rows = R.digits_quality(pipe, DigitObjective(), "1:1,2:0", digits=[3, 7], seeds=[0, 1], steps=6, scale=3.0,
                            refresh=(1, 3))
    assert [r["refresh"] for r in rows] == [1, 3]
    assert rows[0]["relative_l2_to_refresh_1"] == 0.0
    assert rows[1]["relative_l2_to_refresh_1"] > 1e-4  # reuse changed the samples
    assert [r["perturbed_steps"] for r in rows] == [6, 2]
    assert all(0.0 <= r["score"] <= 1.0 and 0.0 <= r["recognised"] <= 1.0 for r in rows)
    assert not __import__("headpag").is_enabled(pipe)
