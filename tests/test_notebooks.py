"""Execute the notebooks top to bottom with tiny settings (``CAPTIONER_NB_FAST=1``).

The kernel is the ``python3`` kernelspec; jupyter_client starts it with the interpreter that runs
the tests (the venv's), so the notebooks import this repository's ``captioner``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run ``notebooks/name`` in ``tmp_path``; return its output folder."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:  # the repository holds no outputs
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    workdir = tmp_path / "work"
    for name in ("CAPTIONER_NB_CKPT", "CAPTIONER_NB_DATA_CONFIG"):  # a user's own model
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CAPTIONER_NB_FAST", "1")
    monkeypatch.setenv("CAPTIONER_NB_WORKDIR", str(workdir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny tensors: threads only oversubscribe
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = NotebookClient(nb, kernel_name="python3", timeout=180,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return workdir


def test_quickstart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from captioner.inference import Captioner

    workdir = _execute("01_quickstart.ipynb", tmp_path, monkeypatch)
    captioner = Captioner.from_checkpoint(workdir / "quickstart.ckpt")
    assert captioner.grid_size == (4, 4) and captioner.image_size == 32
    assert (workdir / "attention.png").stat().st_size > 0
    assert len(list((workdir / "shapes" / "test" / "images").glob("*.png"))) == 6


def test_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = _execute("02_evaluation.ipynb", tmp_path, monkeypatch)
    metrics = json.loads((workdir / "eval" / "metrics_test.json").read_text())
    assert {"BLEU-4", "ROUGE-L", "CIDEr"} <= set(metrics["scores"])
    assert metrics["protocol"]["images"] == 6
    assert 0.0 < metrics["attention_chance"] < 1.0
    assert len(json.loads((workdir / "eval" / "captions_test.json").read_text())) == 6
    assert (workdir / "attention.npz").exists()
