"""scripts/gpu_check.py on the CPU: its checks run (CPU against CPU: the parity is exact) and a
failing check fails the script. On a GPU it compares the device with the CPU (BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import load_script


@pytest.fixture(scope="module")
def gc():
    return load_script("gpu_check")


def test_parity_determinism_and_search_checks_run_and_pass_on_the_cpu(gc, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gc.main(["--device", "cpu", "--only", "parity,search", "--json", str(out)]) == 0
    checks = json.loads(out.read_text())["checks"]
    models = (*gc.SHAPES_MODELS, gc.TRANSLATION_MODEL)
    assert {f"parity/{m}" for m in models} <= set(checks)
    assert {f"deterministic/{m}" for m in (*models, "shapes_stn+heatmap")} <= set(checks)
    assert all(c["ok"] for c in checks.values())
    for m in models:  # the same device on both sides: exactly equal
        assert checks[f"parity/{m}"]["loss_rel"] == 0 and checks[f"parity/{m}"]["grad_rel"] == 0
    assert all(c["bit_identical_twice"] for k, c in checks.items()
               if k.startswith("deterministic/"))
    assert checks["search"]["k5_token_mismatch"] == 0
    assert "passed, 0 failed" in capsys.readouterr().out


def test_a_failing_check_fails_the_script(gc, monkeypatch, capsys):
    """A check that disagrees (or crashes) is reported FAIL and the exit status is 1."""
    real = gc.check_parity

    def off_by_a_bit(device, name):
        out = real(device, name)
        return {**out, "grad_rel": 1.0, "ok": False} if name == "shapes_soft" else out

    monkeypatch.setattr(gc, "check_parity", off_by_a_bit)
    monkeypatch.setattr(gc, "check_deterministic", lambda device, name: 1 / 0)
    assert gc.main(["--device", "cpu", "--only", "parity"]) == 1
    printed = capsys.readouterr().out
    assert "FAIL  parity/shapes_soft" in printed
    assert "FAIL  deterministic/shapes_soft" in printed and "ZeroDivisionError" in printed


def test_unknown_check_names_are_refused(gc):
    with pytest.raises(SystemExit) as e:
        gc.main(["--device", "cpu", "--only", "parities"])
    assert e.value.code == 2


def test_no_tf32_restores_the_settings(gc):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with gc.no_tf32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
