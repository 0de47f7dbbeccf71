"""Every registered backbone x stage placement through ImageEncoder gives the expected (B, L, D).

Each backbone is built once (``weights=None``) and handed to every encoder of its test, so the
big ResNets / VGGs are not rebuilt per placement. Stages start as the identity, so each staged
encoder must also reproduce the plain encoder's annotations (concatenated copies for a
two-transformer "concat" STN at the output).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import captioner.encoders.encoder as encoder_module
from captioner.config import instantiate
from captioner.encoders import ImageEncoder, available_backbones, build_backbone
from captioner.encoders.non_local import NonLocalBlock
from captioner.encoders.stages import available_stages, build_stage, stage_class
from captioner.encoders.stn import SpatialTransformer

BATCH, IMG = 2, 64
GRID = (3, 5)  # odd, not square: L = 15


@pytest.fixture(autouse=True)
def flush_denormals():
    """Randomly initialised deep ResNets in eval mode produce denormal floats, which make CPU
    convolutions ~10x slower (resnet152: 12 s instead of 1 s per forward)."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def _placements(blocks: list[str]) -> list[tuple[str, list[nn.Module], int]]:
    """(description, stages, D multiplier) for the given backbone block names."""
    mid = blocks[len(blocks) // 2]
    out = [("input STN", [SpatialTransformer(where="input")], 1),
           ("input STN, fc localisation, crop-and-zoom 48",
            [SpatialTransformer(where="input", transform="attention", localization="fc",
                                output_size=48)], 1)]
    out += [(f"non-local after {b}", [NonLocalBlock(where=b, subsample=True)], 1) for b in blocks]
    out += [("output non-local", [NonLocalBlock(where="output")], 1),
            ("combination", [
                SpatialTransformer(where="input", transform="similarity"),
                NonLocalBlock(where=blocks[0], pairwise="dot_product", subsample=True),
                SpatialTransformer(where=mid, transform="translation", num_transformers=2,
                                   combine="sequence", localization="heatmap"),
                NonLocalBlock(where="output", pairwise="concatenation"),
                SpatialTransformer(where="output", num_transformers=2, combine="concat"),
            ], 2)]
    return out


@pytest.mark.parametrize("backbone", available_backbones())
def test_every_placement_gives_expected_shape(backbone: str, monkeypatch) -> None:
    torch.manual_seed(0)
    built = build_backbone(backbone, weights=None)
    monkeypatch.setattr(encoder_module, "build_backbone", lambda name, weights=None: built)
    blocks = [name for name, _ in built.body.named_children()]
    images = torch.rand(BATCH, 3, IMG, IMG)
    plain = ImageEncoder(backbone, weights=None, grid_size=GRID).eval()
    with torch.no_grad():
        reference = plain(images)  # (B, L, D)
    d = built.out_channels
    assert reference.shape == (BATCH, GRID[0] * GRID[1], d)

    placements = _placements(blocks)
    assert len(placements) == len(blocks) + 4
    for description, stages, multiplier in placements:
        encoder = ImageEncoder(backbone, weights=None, grid_size=GRID, stages=stages).eval()
        assert encoder.out_channels == multiplier * d, description
        with torch.no_grad():
            annotations = encoder(images)
        assert annotations.shape == (BATCH, 15, multiplier * d), description
        if "crop-and-zoom" in description:
            continue  # resamples the image: not the identity
        expected = reference.repeat(1, 1, multiplier)  # (B, L, multiplier * D)
        torch.testing.assert_close(annotations, expected, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{backbone} / {description}: {m}")


def test_misplaced_stages_are_rejected() -> None:
    with pytest.raises(ValueError, match="valid places for shapes_cnn"):
        ImageEncoder("shapes_cnn", grid_size=GRID, stages=[NonLocalBlock(where="layer3")])
    # a concat STN away from the output is refused when it is built by its constructor
    with pytest.raises(ValueError, match="only a stage at 'output'"):
        SpatialTransformer(where="conv2", num_transformers=3)


def test_stages_from_config_as_lightning_cli_builds_them() -> None:
    encoder = instantiate("captioner.encoders.ImageEncoder", {
        "backbone": "shapes_cnn",
        "grid_size": [3, 5],
        "stages": [
            {"class_path": "captioner.encoders.stn.SpatialTransformer",
             "init_args": {"where": "input", "transform": "attention", "output_size": [48, 40]}},
            {"class_path": "captioner.encoders.non_local.NonLocalBlock",
             "init_args": {"where": "conv2", "pairwise": "dot_product", "subsample": True}},
            {"class_path": "captioner.encoders.stn.SpatialTransformer",
             "init_args": {"where": "output", "num_transformers": 2}},
        ],
    })
    kinds = [type(s) for s in encoder.stages]
    assert kinds == [SpatialTransformer, NonLocalBlock, SpatialTransformer]
    assert encoder.stages[0].output_size == (48, 40)
    assert encoder.stages[1].in_channels == 64  # conv2 of shapes_cnn, found by the encoder
    assert encoder.out_channels == 256
    assert encoder(torch.rand(1, 3, 64, 64)).shape == (1, 15, 256)


def test_stage_registry() -> None:
    assert available_stages() == ["non_local", "spatial_transformer"]
    assert stage_class("spatial_transformer") is SpatialTransformer
    block = build_stage("non_local", where="layer3", pairwise="gaussian")
    assert isinstance(block, NonLocalBlock) and block.where == "layer3"
    with pytest.raises(ValueError, match="available: non_local, spatial_transformer"):
        stage_class("deformable")


def test_state_dict_round_trip_through_config() -> None:
    """A checkpoint's encoder is rebuilt from its config (stages built by the encoder), then
    loaded strictly: the stages' parameters must exist before ``load_state_dict``."""
    config = {"backbone": "shapes_cnn", "grid_size": 3, "stages": [
        {"class_path": "captioner.encoders.stn.SpatialTransformer", "init_args": {}},
        {"class_path": "captioner.encoders.non_local.NonLocalBlock",
         "init_args": {"where": "conv3"}}]}
    torch.manual_seed(4)
    trained = instantiate("captioner.encoders.ImageEncoder", config).eval()
    with torch.no_grad():  # move both stages away from the identity
        trained.stages[0].localisation[0][-1].bias.add_(0.1)
        trained.stages[1].bn.weight.fill_(1.0)
    rebuilt = instantiate("captioner.encoders.ImageEncoder", config).eval()
    rebuilt.load_state_dict(trained.state_dict(), strict=True)
    images = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), trained(images))
