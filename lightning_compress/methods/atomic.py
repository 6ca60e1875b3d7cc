"""Write a file so that its path only ever holds the old content or the whole new one.

Every artifact the package writes (packed models, reports, sensitivity curves, decomposition plans)
goes through :func:`write_atomic` or :func:`atomic_open`: the bytes go to a temporary file in the
target's folder, are flushed to disk, and the temporary file is renamed over the target. A rename
within one file system is atomic, so a run killed mid-write (out of memory, a pre-empted job, Ctrl-C)
leaves the previous file or none, never a truncated one that a later load would trip over.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

Content = bytes | bytearray | memoryview | str | Callable[[IO[bytes]], object]


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file to write; on a clean exit it replaces ``path``, on an exception it is removed.

    The parent folder must exist. The temporary file is ``.<name>.<random>.partial`` beside ``path``:
    the same file system (so the rename is atomic), a unique name (so two writers never share one),
    hidden (so a glob over the folder does not pick it up).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     target = Path(folder) / "out.bin"
        ...     with atomic_open(target) as file:
        ...         _ = file.write(b"complete")
        ...     target.read_bytes(), sorted(p.name for p in Path(folder).iterdir())
        (b'complete', ['out.bin'])
    """
    path = Path(path)
    temporary, descriptor = _create_beside(path)
    try:
        with os.fdopen(descriptor, "wb") as file:
            yield file
            file.flush()
            # Without fsync a crash after the rename can leave the new name pointing at empty blocks.
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_atomic(path: str | os.PathLike, content: Content) -> Path:
    """Write ``content`` to ``path`` atomically and return the path.

    Args:
        path: the file to (re)place; its folder must exist.
        content: bytes, text (written as UTF-8), or a function that writes to the binary file
            object it is given (for writers that want a file, such as ``Figure.savefig``).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     written = write_atomic(Path(folder) / "note.txt", "héllo\\n")
        ...     written.read_text(encoding="utf-8")
        'héllo\\n'
    """
    path = Path(path)
    with atomic_open(path) as file:
        if callable(content):
            content(file)
        else:
            file.write(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _create_beside(path: Path) -> tuple[Path, int]:
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
        try:
            # 0o666 through the umask, as open() would create the target: a temporary file from the
            # tempfile module is 0o600, and the rename would carry that mode over to the artifact.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            return temporary, os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; folders cannot be opened for this on Windows, so skip there."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems (network mounts) refuse fsync on a folder: the data is synced
        pass
    finally:
        os.close(descriptor)
