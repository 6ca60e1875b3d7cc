from __future__ import annotations

import pytest

from lightning_compress.methods.pruning import PruningSchedule


def test_one_shot_from_start_epoch():
    s = PruningSchedule("one_shot", final=0.7, start_epoch=2)
    assert s.target(19, steps_per_epoch=10) is None
    assert s.target(20, steps_per_epoch=10) == 0.7 and s.target(1000, steps_per_epoch=10) == 0.7


def test_iterative_rounds_rise_linearly_each_epoch():
    s = PruningSchedule("iterative", final=0.8, start_epoch=1, end_epoch=4)
    targets = [s.target(epoch * 10 + 3, steps_per_epoch=10) for epoch in range(7)]
    assert targets == [None, 0.2, 0.4, pytest.approx(0.6), 0.8, 0.8, 0.8]


def test_agp_is_cubic_and_moves_in_frequency_steps():
    s = PruningSchedule("agp", final=0.9, start_epoch=1, end_epoch=5, initial=0.1, frequency=7)
    spe = 10
    assert s.target(9, spe) is None
    assert s.target(10, spe) == pytest.approx(0.1)
    for step in range(10, 50):
        quantised = 10 + (step - 10) // 7 * 7
        p = min(1.0, (quantised - 10) / 40)
        assert s.target(step, spe) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - p) ** 3)
    # From the first step of end_epoch on, the final sparsity, even off the frequency's grid (49 is).
    assert s.target(49, spe) < 0.9
    assert all(s.target(step, spe) == pytest.approx(0.9) for step in range(50, 100))


def test_agp_reaches_its_final_sparsity_at_end_epoch_whatever_the_frequency():
    s = PruningSchedule("agp", final=0.8, start_epoch=0, end_epoch=2, frequency=100)
    assert s.target(0, steps_per_epoch=16) == 0.0
    assert s.target(31, steps_per_epoch=16) == 0.0  # no update step inside a ramp shorter than the frequency
    assert s.target(32, steps_per_epoch=16) == pytest.approx(0.8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="agp", final=1.0), "sparsity=1.0 must be in"),
        (dict(kind="agp", final=-0.1), "sparsity=-0.1"),
        (dict(kind="cubic", final=0.5), "schedule='cubic'.*'one_shot', 'iterative', 'agp'"),
        (dict(kind="agp", final=0.5, start_epoch=5, end_epoch=2), "end_epoch=2 must be >= start_epoch=5"),
        (dict(kind="agp", final=0.5, start_epoch=3, end_epoch=3), "end_epoch > start_epoch"),
        (dict(kind="agp", final=0.5, end_epoch=3, frequency=0), "frequency=0"),
        (dict(kind="agp", final=0.5, end_epoch=3, initial=0.6), "initial_sparsity=0.6"),
    ],
)
def test_bad_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningSchedule(**kwargs)
