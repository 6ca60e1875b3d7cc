"""The benchmark scripts import, and the peer they configure follows the intended schedule."""

from __future__ import annotations

import pytest
from torch import nn


def test_model_pruning_amounts_compose_to_the_cubic_ramp():
    from benchmarks.pruning_proxy import cubic, model_pruning

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    peer = model_pruning(model, final=0.98, ramp_epochs=8)
    remaining = 1.0
    for epoch in range(10):
        remaining *= 1.0 - peer.amount(epoch)
        assert 1.0 - remaining == pytest.approx(cubic((epoch + 1) / 8, 0.98))
    assert 1.0 - remaining == pytest.approx(0.98)
    assert len(peer._parameters_to_prune) == 2  # convolutions and linear layers only, no BatchNorm


def test_benchmark_modules_import():
    import benchmarks.data_pipeline  # noqa: F401
    import benchmarks.proxy  # noqa: F401


def test_new_benchmark_modules_import():
    import benchmarks.decomposition_proxy  # noqa: F401
    import benchmarks.decomposition_vgg19  # noqa: F401
    import benchmarks.quantization_proxy  # noqa: F401


def test_frontier_table_comes_from_the_results_jsons(tmp_path):
    from benchmarks import frontier

    rows = frontier.rows()
    assert {r["technique"] for r in rows} == {"pruning", "deep compression", "decomposition", "quantization"}
    assert all(r["source"].endswith(".json") for r in rows)
    table = frontier.table(rows)
    assert table.count("\n") == len(rows) + 1 and "<" not in table
    frontier.plot(rows, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    readme = frontier.README.read_text()
    assert table in readme  # the README shows what the JSONs hold
