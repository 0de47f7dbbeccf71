"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The data is written to a temporary file in the destination's folder, flushed to disk and moved
onto the destination with ``os.replace`` (atomic on POSIX and Windows within one file system).
If the writer fails or is killed, the temporary file is removed (or, on a hard kill, left as a
hidden ``.NAME.*.tmp`` file) and the destination is untouched.

The new file gets the permissions an ordinary ``open(path, "w")`` would give (``0o666`` minus
the umask), not ``tempfile.mkstemp``'s private ``0o600``, so a shared vocabulary or feature cache
stays readable by the users an ordinary file would be readable by.

Used for checkpoints' companions (vocabularies), feature caches, result files and figures.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_path", "atomic_write"]


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix, so writers that pick a format by
    extension keep it) for the caller to write; move it onto ``path`` on success.

    Parent folders are created.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=f".tmp{out.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w",
                 encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing (``mode`` ``"w"`` or ``"wb"``), yield
    it, then flush it to disk and move it onto ``path``.

    Example::

        with atomic_write("vocab.json") as f:
            json.dump(d, f)
    """
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
