"""scripts/stn_classification.py: the STN evidence experiment of issue 5, at toy size.

Plumbing and the views; the experiment's own figures are in docs/stn_experiment.md.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import load_script


@pytest.fixture(scope="module")
def sc():
    return load_script("stn_classification")


def test_script_writes_results_figure_and_the_transform_comparison(sc, tmp_path):
    """A one-epoch run of both views writes ``results.json`` / ``.md`` and the warp figure,
    and compares the STN's transform with every test image's distortion. (Whether the STN
    learns to centre the shapes takes ~15 k images of training, minutes on this CPU: that is
    measured by the experiment, docs/stn_experiment.md; the learning itself is tested on a
    cheaper task by tests/encoders/test_stn.py::test_stn_learns_to_centre_a_blob.)"""
    results = sc.main(["--num-train", "128", "--num-test", "40", "--epochs", "1",
                       "--view", "8", "--head", "fc", "--transform", "attention",
                       "--localization", "heatmap", "--variants", "downsampled", "stn",
                       "--figure-images", "3", "--out", str(tmp_path)])
    from captioner.metrics import json_safe

    written = (tmp_path / "results.json").read_text()
    assert "NaN" not in written  # an undefined correlation is null (valid JSON)
    assert json.loads(written) == json.loads(json.dumps(json_safe(results)))
    assert set(results["models"]) == {"downsampled", "stn"}
    for r in results["models"].values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["train_seconds"] > 0
    d = results["stn_vs_distortion"]
    identity = torch.tensor([p.centre for p in sc.DistortedShapes(40, seed=1_000_003).params])
    assert d["centre_error_identity_px"] == pytest.approx(float(identity.norm(dim=-1).mean() * 32))
    assert 0.0 < d["scale_mean"] < 2.0 and d["rotation_std_deg"] == 0.0  # no rotation: attention
    assert (tmp_path / "stn_warps.png").stat().st_size > 0
    md = (tmp_path / "results.md").read_text()
    assert "heatmap" in md and "| stn |" in md and "| downsampled |" in md


def test_identity_view_and_heads(sc):
    """``downsampled`` is a frozen identity transformer (its view is the whole image
    resampled); ``fc`` and ``gap`` heads give (B, 4) logits for any view; bad heads are
    named."""
    args = sc.parse_args(["--view", "12", "--head", "fc"])
    model = sc.build("downsampled", args)
    assert not any(p.requires_grad for p in model.stn.parameters())
    images = torch.randn(3, 3, 64, 64)
    assert model(images).shape == (3, 4)
    view = model.stn(images)  # (3, 3, 12, 12)
    torch.testing.assert_close(
        view, torch.nn.functional.interpolate(images, size=12, mode="bilinear",
                                              align_corners=False, antialias=False),
        atol=1e-4, rtol=1e-4)  # the STN samples in float64
    full = sc.build("full", sc.parse_args(["--head", "gap"]))
    assert full.stn is None and full(images).shape == (3, 4)
    with pytest.raises(ValueError, match="unknown head 'max'"):
        sc.ShapeClassifier(4, view=8, head="max")
