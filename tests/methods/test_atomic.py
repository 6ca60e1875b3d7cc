"""Atomic writes: a path holds the old file or the whole new one, whatever interrupts the writer."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

import lightning_compress.methods.atomic as atomic_module
from lightning_compress.methods.atomic import atomic_open, write_atomic

ATOMIC_SOURCE = Path(atomic_module.__file__)


def test_bytes_text_and_writers_are_written_whole(tmp_path):
    assert write_atomic(tmp_path / "a.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert write_atomic(tmp_path / "b.txt", "naïve\n").read_bytes() == "naïve\n".encode()
    assert write_atomic(tmp_path / "c.bin", lambda file: file.write(b"from a writer")).read_bytes() == b"from a writer"
    write_atomic(tmp_path / "a.bin", memoryview(b"replaced"))
    assert (tmp_path / "a.bin").read_bytes() == b"replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.bin"]  # no temporary left


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")

    def half_then_fail(file):
        file.write(b"new but only ha")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_atomic(target, half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(target) as file:
            file.write(b"partial")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_the_file_gets_the_mode_open_would_give_it(tmp_path):
    """Not the 0o600 of a tempfile: the rename would carry that over to a file meant to be shared."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    assert stat.S_IMODE(write_atomic(tmp_path / "atomic", b"x").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_a_killed_writer_never_leaves_a_half_file_at_the_path(tmp_path):
    """SIGKILL mid-write (the out-of-memory killer, a pre-empted job): the path keeps the old file."""
    target = tmp_path / "model.lcpk"
    target.write_bytes(b"old, complete")
    child = textwrap.dedent(f"""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("atomic", {str(ATOMIC_SOURCE)!r})
        atomic = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(atomic)  # plain Python: no torch or Lightning to import
        with atomic.atomic_open({str(target)!r}) as file:
            file.write(b"n" * (1 << 20))
            file.flush()
            print("writing", flush=True)
            time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE)
    try:
        assert process.stdout.readline() == b"writing\n"
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        process.kill()
    assert target.read_bytes() == b"old, complete"
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    # The half-written temporary stays, hidden and beside the target, never under the target's name.
    assert len(leftovers) == 1 and leftovers[0].startswith(".model.lcpk.") and leftovers[0].endswith(".partial")


def test_the_atomic_helper_imports_nothing_heavy():
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("atomic_alone", {str(ATOMIC_SOURCE)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(sorted(name for name in ("torch", "lightning", "numpy") if name in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture
def replaced(monkeypatch) -> list[tuple[Path, Path]]:
    """Every (temporary, target) that os.replace renames while the test runs."""
    calls: list[tuple[Path, Path]] = []
    real = os.replace

    def recording(source, target, *args, **kwargs):
        calls.append((Path(source), Path(target)))
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", recording)
    return calls


def _assert_written_beside(replaced: list[tuple[Path, Path]], target: Path) -> None:
    assert target.exists()
    sources = [source for source, dest in replaced if dest == target]
    assert sources, f"{target.name} was not renamed into place"
    assert all(source.parent == target.parent and source.name.endswith(".partial") for source in sources)


def test_every_artifact_is_written_beside_its_target_and_renamed(tmp_path, replaced):
    from lightning_compress.callbacks.decomposition import TensorDecomposition
    from lightning_compress.methods import compression_report
    from lightning_compress.methods.pruning.sensitivity import SensitivityResult
    from lightning_compress.methods.sharing.packed import save_compressed
    from lightning_compress.sensitivity import _write_sparsity_yaml

    save_compressed(nn.Linear(4, 3), tmp_path / "model.lcpk")
    _assert_written_beside(replaced, tmp_path / "model.lcpk")

    compression_report(nn.Sequential(nn.Linear(4, 3))).to_json(tmp_path / "reports" / "report.json")
    _assert_written_beside(replaced, tmp_path / "reports" / "report.json")

    result = SensitivityResult(baseline=0.9, levels=[0.5], curves={"0": [0.8]}, params={"0": 12})
    result.to_json(tmp_path / "sensitivity.json")
    _assert_written_beside(replaced, tmp_path / "sensitivity.json")
    assert SensitivityResult.from_json(tmp_path / "sensitivity.json") == result
    _write_sparsity_yaml(tmp_path / "sparsity.yaml", result, max_drop=0.2, batch_count=1)
    _assert_written_beside(replaced, tmp_path / "sparsity.yaml")

    callback = TensorDecomposition(print_table=False)
    callback._write(SimpleNamespace(logger=object(), log_dir=str(tmp_path / "logs")))
    _assert_written_beside(replaced, tmp_path / "logs" / "decomposition.json")
    assert json.loads((tmp_path / "logs" / "decomposition.json").read_text()) == {"method": "tucker", "layers": []}

    pytest.importorskip("matplotlib")
    result.plot(tmp_path / "sensitivity.png")
    _assert_written_beside(replaced, tmp_path / "sensitivity.png")
    assert (tmp_path / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result.plot(tmp_path / "sensitivity.pdf")  # the format still follows the suffix
    assert (tmp_path / "sensitivity.pdf").read_bytes()[:5] == b"%PDF-"
    assert not any(p.name.endswith(".partial") for p in tmp_path.rglob("*"))
