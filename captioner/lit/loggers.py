"""A CSV logger whose metrics survive a fit resumed into the same folder.

Lightning's ``CSVLogger`` deletes the ``metrics.csv`` it finds in its folder when it starts
(with a warning: "Previous log files in this directory will be deleted"). A fit resumed with a
fixed logger version (``--trainer.logger.init_args.version NAME --ckpt_path last``, as the
README advises) thus lost the curve of every epoch before the resume. :class:`ResumableCSVLogger`
keeps the file:

* a **resumed** fit keeps the earlier rows logged before the checkpoint's step (the rows a
  killed run logged after its last checkpoint are logged again by the resumed run, so they are
  replaced), and its own rows follow them;
* a **new** fit into a folder that holds a ``metrics.csv`` moves that file aside
  (``metrics.before-N.csv``, with a warning) rather than deleting it or mixing two runs;
* ``validate`` / ``test`` into the fit's folder (``--ckpt_path last``) keep every earlier row,
  and their own rows follow them;
* an unreadable ``metrics.csv`` (another encoding, a damaged row) is moved aside the same way.

The captioner modules tell the logger which case it is when training, validation or testing
starts (:meth:`ResumableCSVLogger.continue_from`). With another module the logger is not
told: the earlier rows are kept when this run logs after all of them, and the file is moved
aside otherwise, so that no row is ever dropped on a guess.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from captioner.atomic import aside_name, atomic_path

__all__ = ["ResumableCSVLogger"]


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV experiment writer, except that an existing ``metrics.csv`` is read rather
    than deleted; at the first save it is rewritten with the rows kept, moved aside, or (a
    header only) removed, as :mod:`captioner.lit.loggers` says. An unreadable one is moved
    aside when the writer is built.

    Args:
        log_dir: the run's folder.
        start: shared with the logger: ``{"step": float | None}`` once
            :meth:`ResumableCSVLogger.continue_from` has said where this run starts.
    """

    def __init__(self, log_dir: str, start: dict[str, float | None]) -> None:
        self._start = start
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        """(Lightning's writer calls this from its ``__init__``, where it deletes the file.)
        Read the earlier rows and columns instead."""
        self._earlier: list[dict[str, str]] | None = None
        if not self._fs.isfile(self.metrics_file_path):
            return
        try:
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                reader = csv.DictReader(file)
                rows = [{k: v for k, v in row.items() if k is not None} for row in reader]
                keys = sorted(reader.fieldnames or [])
        except (csv.Error, UnicodeDecodeError, ValueError) as e:
            aside = self._move_aside()
            rank_zero_warn(f"{self.metrics_file_path} cannot be read ({e}): moved to {aside}; "
                           "this run starts a new file")
            return
        self._earlier, self.metrics_keys = rows, keys

    def save(self) -> None:
        if self._earlier is not None and self.metrics:
            self._continue_file()
            self._earlier = None
        super().save()

    def _continue_file(self) -> None:
        """Keep the earlier rows this run does not log again, or move the file aside."""
        assert self._earlier is not None
        told = "step" in self._start
        start = self._start.get("step")
        if not self._earlier:  # a header at most: nothing to keep or to move
            self._fs.rm_file(self.metrics_file_path)
            self.metrics_keys = []
            return
        if told and start is None:  # a new fit, not a resume
            self._restart(f"{self.metrics_file_path} held another run's metrics (this fit is not "
                          "a resume)")
            return
        if not told:  # another module: keep the rows only if none would be dropped
            start = min(int(m["step"]) for m in self.metrics)
        kept = [row for row in self._earlier if start == float("inf") or _step(row) < start]
        if not told and len(kept) < len(self._earlier):
            self._restart(f"{self.metrics_file_path} holds rows at or after this run's first "
                          f"step ({start}) and the module did not say whether it resumes")
            return
        self._write(kept)
        rank_zero_info(f"{self.metrics_file_path}: {len(kept)} earlier rows kept"
                       f"{'' if start == float('inf') else f' (before step {start})'}; this "
                       "run's rows follow them")

    def _restart(self, why: str) -> None:
        """Move the earlier file aside, saying ``why``; this run starts a new one."""
        aside = self._move_aside()
        self.metrics_keys = []
        rank_zero_warn(f"{why}: moved to {aside}")

    def _move_aside(self) -> str:
        """Rename ``metrics.csv`` to the first free ``metrics.before-N.csv``; returns that."""
        n = 1
        while self._fs.exists(aside := os.path.join(self.log_dir,
                                                    aside_name(self.NAME_METRICS_FILE, n))):
            n += 1
        self._fs.mv(self.metrics_file_path, aside)
        return aside

    def _write(self, rows: list[dict[str, str]]) -> None:
        """Replace ``metrics.csv`` by ``rows`` (atomically on a local disk), in the encoding
        Lightning then appends in (the locale's)."""
        if isinstance(self._fs, LocalFileSystem):
            with atomic_path(self.metrics_file_path) as tmp:
                with open(tmp, "w", newline="") as file:  # noqa: PLW1514 - Lightning's encoding
                    _write_rows(file, self.metrics_keys, rows)
        else:
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                _write_rows(file, self.metrics_keys, rows)


def _write_rows(file: Any, keys: list[str], rows: list[dict[str, str]]) -> None:
    writer = csv.DictWriter(file, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def _step(row: dict[str, str]) -> float:
    """A row's ``step`` (a row without one sorts last, so it is superseded)."""
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")


class ResumableCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` (same arguments) that keeps the ``metrics.csv`` already in its
    folder: a fit resumed with a fixed ``version`` continues the earlier run's file instead of
    deleting it, and a new fit moves it aside (see :mod:`captioner.lit.loggers`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start: dict[str, float | None] = {}

    def continue_from(self, step: float | None) -> None:
        """Say where this run starts, before its first save: the restored global step of a
        resumed fit (earlier rows before it are kept), ``math.inf`` for ``validate`` / ``test``
        (every earlier row kept), or ``None`` for a new fit (an earlier file is moved aside)."""
        self._start["step"] = step

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self._start)
        return self._experiment
