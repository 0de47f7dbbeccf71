"""A CSV logger whose metrics survive a fit resumed into the same folder.

Lightning's ``CSVLogger`` deletes the ``metrics.csv`` it finds in its folder when it starts
(with a warning: "Previous log files in this directory will be deleted"). A fit resumed with a
fixed logger version (``--trainer.logger.init_args.version NAME --ckpt_path last``, as the
README advises) thus lost the curve of every epoch before the resume. :class:`ResumableCSVLogger`
keeps the file: the earlier rows stay, except those at or after the resumed run's first logged
step (the epochs a killed run logged after its last checkpoint, which the resumed run logs
again), and the resumed run's rows follow them.
"""

from __future__ import annotations

import csv
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_info

from captioner.atomic import atomic_path

__all__ = ["ResumableCSVLogger"]


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV experiment writer, except that an existing ``metrics.csv`` is read rather
    than deleted, and rewritten once, at the first save, without the rows the new run supersedes
    (``step`` at or after its first logged step)."""

    def _check_log_dir_exists(self) -> None:
        self._earlier: list[dict[str, str]] | None = None
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            self._earlier = list(reader)
            self.metrics_keys = sorted(reader.fieldnames or [])
        rank_zero_info(f"{self.metrics_file_path}: {len(self._earlier)} earlier rows kept; "
                       "this run's rows follow them")

    def save(self) -> None:
        if self._earlier is not None and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            kept = [row for row in self._earlier if _step(row) < first]
            self._write(kept)
            self._earlier = None
        super().save()

    def _write(self, rows: list[dict[str, str]]) -> None:
        """Replace ``metrics.csv`` by ``rows`` (atomically on a local disk)."""
        if isinstance(self._fs, LocalFileSystem):
            with atomic_path(self.metrics_file_path) as tmp:
                with open(tmp, "w", newline="", encoding="utf-8") as file:
                    _write_rows(file, self.metrics_keys, rows)
        else:
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                _write_rows(file, self.metrics_keys, rows)


def _write_rows(file: Any, keys: list[str], rows: list[dict[str, str]]) -> None:
    writer = csv.DictWriter(file, fieldnames=keys)
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
    deleting it."""

    @property
    def experiment(self) -> Any:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment
