from __future__ import annotations

from lightning_compress.data.sampling import EpochSeededRandomSampler


def test_order_depends_on_seed_and_epoch_only():
    data = list(range(50))
    a, b = EpochSeededRandomSampler(data, seed=1), EpochSeededRandomSampler(data, seed=1)
    first = list(a)
    assert first == list(b) and sorted(first) == data
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(EpochSeededRandomSampler(data, seed=2)) != first


def test_default_seed_follows_seed_everything(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    assert EpochSeededRandomSampler(range(3)).seed == 7
