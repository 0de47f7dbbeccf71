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
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["aside_name", "atomic_path", "atomic_write", "remove_leftovers"]


def _create_temp(folder: Path, prefix: str, suffix: str) -> Path:
    """A new empty file in ``folder``, created with mode ``0o666`` so that the kernel applies
    the umask (``tempfile.mkstemp`` would give ``0o600``; reading the umask means setting it,
    which races with other threads)."""
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name in {folder}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix, so writers that pick a format by
    extension keep it) for the caller to write; move it onto ``path`` on success.

    Parent folders are created.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = _create_temp(out.parent, f".{out.name}.", f".tmp{out.suffix}")
    except FileExistsError:
        raise
    except OSError as e:  # name the destination, not the hidden temporary name
        raise type(e)(e.errno, e.strerror, str(out)) from None
    try:
        yield tmp
        _fsync_file(tmp)  # the caller's writer closed it; its data reach the disk first
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(out.parent)  # the rename itself survives a power loss


def _fsync_file(path: Path) -> None:
    """Flush a written file's data to disk (opened for writing: Windows' ``FlushFileBuffers``
    refuses a read-only handle)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries to disk (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_leftovers(folder: str | os.PathLike[str], name_glob: str) -> list[Path]:
    """Delete the temporary files that hard-killed atomic writes of files named ``name_glob``
    (a glob, e.g. ``"shard_*.npy"``) left in ``folder``; returns them.

    Only for a writer that holds the folder exclusively: another writer's temporary file in
    use would be deleted under it.
    """
    leftovers = sorted(Path(folder).glob(f".{name_glob}.*.tmp*"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


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
            yield f  # closed here, then flushed to disk by atomic_path


def aside_name(name: str, n: int) -> str:
    """The name an earlier run's file takes when it is moved aside rather than replaced:
    ``metrics.csv`` -> ``metrics.before-N.csv`` (:mod:`captioner.lit.loggers`, and the test
    results of :meth:`captioner.lit.base.CaptionerModule.keep_earlier_results`)."""
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}.before-{n}.{suffix}" if dot else f"{name}.before-{n}"
