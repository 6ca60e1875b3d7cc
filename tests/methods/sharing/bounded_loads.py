"""``load_compressed`` in a child process with a capped address space, one load per request.

A hostile file that got past the checks would allocate gigabytes or decode for minutes; in this
child it ends as a ``MemoryError`` reply (the address space is capped with ``RLIMIT_AS``) or as a
timeout, never as a machine brought down. One child serves every load of a test module: starting
one (importing torch) costs seconds, a load milliseconds.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HEADROOM = 3 << 29  # 1.5 GiB beyond what the interpreter, torch and the reference states map
ROOT = Path(__file__).resolve().parents[3]


class BoundedLoader:
    """Start with ``{base name: path of the unmodified file}``; :meth:`load` compares with that base."""

    def __init__(self, bases: dict[str, str], timeout: float = 60.0) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from tests.methods.sharing.bounded_loads import serve; serve()", json.dumps(bases)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, cwd=ROOT, env=env,
        )
        self._buffer = b""
        self.ready = self._reply(timeout, "start")

    def load(self, path: str | Path, base: str, timeout: float = 20.0) -> dict[str, Any]:
        """``{"outcome": "exact" | "loaded" | "value_error" | "error", "seconds", "message" | "signature"}``."""
        self.process.stdin.write((json.dumps({"path": str(path), "base": base}) + "\n").encode())
        self.process.stdin.flush()
        return self._reply(timeout, f"load of {path}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.stderr.close()

    def _reply(self, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            readable = select.select([self.process.stdout], [], [], max(left, 0))[0] if left > 0 else []
            chunk = os.read(self.process.stdout.fileno(), 1 << 16) if readable else b""
            if not chunk:
                self.process.kill()
                self.process.wait()
                self.stderr.seek(0)
                tail = self.stderr.read()[-3000:].decode(errors="replace")
                reason = "timed out" if left <= 0 else f"died (exit {self.process.returncode})"
                raise AssertionError(f"{what}: the loader process {reason} after {timeout:.0f} s\n{tail}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


def serve() -> None:
    """The child: load the bases, cap the address space, then answer one JSON line per request."""
    import resource

    import torch

    from lightning_compress.methods.sharing.packed import load_compressed

    torch.set_num_threads(1)
    bases = {name: load_compressed(path) for name, path in json.loads(sys.argv[1]).items()}
    mapped = _mapped_bytes()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + HEADROOM, hard))
    _answer({"ready": True, "limit_bytes": mapped + HEADROOM})
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        try:
            state = load_compressed(request["path"])
            signature = [[key, str(value.dtype).removeprefix("torch."), list(value.shape)]
                         for key, value in state.items()]
            exact = _bit_exact(state, bases[request["base"]])
            reply = {"outcome": "exact" if exact else "loaded", "signature": signature}
        except ValueError as error:
            reply = {"outcome": "value_error", "message": str(error)[:4000]}
        except Exception as error:  # MemoryError included: that is what the cap turns a blow-up into
            reply = {"outcome": "error", "message": f"{type(error).__name__}: {str(error)[:4000]}"}
        state = None  # freed before the next load, whatever happened
        reply["seconds"] = time.perf_counter() - start
        _answer(reply)


def _answer(reply: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


def _mapped_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _bit_exact(state: dict, reference: dict) -> bool:
    if list(state) != list(reference):
        return False
    return all(
        value.dtype == reference[key].dtype and value.shape == reference[key].shape
        and _raw_bytes(value) == _raw_bytes(reference[key])
        for key, value in state.items()
    )


def _raw_bytes(tensor) -> bytes:
    """The bit patterns, so that -0.0 differs from 0.0 and NaN equals NaN."""
    import torch

    if tensor.numel() == 0:
        return b""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
