"""Image encoder: backbone + ordered stages -> annotation vectors (Xu et al. 2015, Section 3.1.1).

The encoder produces ``L`` annotation vectors ``a = {a_1, ..., a_L}, a_i in R^D``, one per cell
of an ``H x W`` grid of a convolutional feature map (the paper uses VGG conv5_4: 14 x 14 x 512).

Pipeline, for images ``(B, 3, H_img, W_img)`` in ``[0, 1]``::

    x = (images - mean) / std                     # normalisation of the backbone's weights
    x = stages placed at "input"(x)               # e.g. a Spatial Transformer on the image
    for each named backbone block b:
        x = b(x); x = stages placed after b(x)    # e.g. a non-local block after "layer3"
    x = stages placed at "output"(x)              # (B, D, H', W')
    a = AdaptiveAvgPool2d(H, W)(x)                # (B, D, H, W); GridPool: also deterministic
    a = a.flatten(2).transpose(1, 2)              # (B, L, D)

Stage contract: an ``nn.Module`` with a string attribute ``where`` (``"input"``, ``"output"`` or
the name of a backbone block) mapping ``(B, C, h, w)`` to ``(B, C', h', w')``. If it has a method
``build(in_channels: int) -> int`` the encoder calls it once with the channel count at its place
(so YAML never repeats channel counts) and uses the returned output channel count.
"""

from __future__ import annotations

from collections import defaultdict
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from captioner.encoders.backbone import (available_backbones, build_backbone, load_pretrained,
                                         no_weights_as_none)
from captioner.encoders.pooling import GridPool


class ImageEncoder(nn.Module):
    """CNN encoder returning a grid of annotation vectors ``(B, L, D)``.

    Args:
        backbone: registered backbone name (see
            :func:`captioner.encoders.backbone.available_backbones`) or the dotted path of a
            builder ``f(weights) -> Backbone`` (``mypackage.module.build_tiny``).
        weights: torchvision weights enum name (``"IMAGENET1K_V1"``, ``"DEFAULT"``), ``"IMAGENET"``
            for efficientnet_lite0, or ``None`` for random initialisation.
        grid_size: ``H`` (square grid) or ``(H, W)`` of the pooled annotation grid.
        stages: ordered extra modules placed in the network (Spatial Transformer, Non-local...).
        freeze: freeze the backbone (default). Stages always train.
        finetune_blocks: with ``freeze``, number of last backbone blocks that still train.
    """

    def __init__(
        self,
        backbone: str = "resnet101",
        weights: str | None = None,
        grid_size: int | tuple[int, int] = 14,
        stages: Sequence[nn.Module] = (),
        freeze: bool = True,
        finetune_blocks: int = 0,
    ) -> None:
        super().__init__()
        weights = no_weights_as_none(weights)
        built = build_backbone(backbone, weights)
        self.backbone_name = backbone
        self.body = built.body
        self.probe_size = built.probe_size
        self.register_buffer("mean", torch.tensor(built.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(built.std).view(1, 3, 1, 1), persistent=False)
        self.grid = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        if len(self.grid) != 2 or any(int(g) < 1 for g in self.grid):
            raise ValueError(f"grid_size must be H or (H, W) with H, W >= 1, got {grid_size}")
        self.pool = GridPool(self.grid)
        self.stages = nn.ModuleList(stages)
        self._place_stages(built.out_channels)

        block_names = [name for name, _ in self.body.named_children()]
        if not 0 <= finetune_blocks <= len(block_names):
            raise ValueError(
                f"finetune_blocks={finetune_blocks} but {backbone} has {len(block_names)} blocks"
            )
        self.frozen_blocks = set(block_names[: len(block_names) - finetune_blocks]) if freeze else set()
        if self.frozen_blocks and weights is None and built.has_pretrained and load_pretrained():
            warnings.warn(f"{backbone} is built without pretrained weights (weights: null) and "
                          f"{len(self.frozen_blocks)} of its {len(block_names)} blocks are frozen: "
                          "they stay random. Name its weights (e.g. weights: DEFAULT), or train "
                          "it (freeze: false)", UserWarning, stacklevel=2)
        for name, block in self.body.named_children():
            block.requires_grad_(name not in self.frozen_blocks)
        self.train()  # frozen blocks (and their batch-norm statistics) start in eval mode

    @property
    def grid_size(self) -> tuple[int, int]:
        """``(H, W)`` of the annotation grid; ``L = H * W``."""
        return self.grid

    def _place_stages(self, backbone_channels: int) -> None:
        names = [n for n, _ in self.body.named_children()]
        valid = {"input", "output", *names}
        self._after: dict[str, list[int]] = defaultdict(list)
        for i, stage in enumerate(self.stages):
            where = getattr(stage, "where", "output")
            if where not in valid:
                raise ValueError(
                    f"stage {type(stage).__name__} has where={where!r}; valid places for "
                    f"{self.backbone_name}: {', '.join(['input', *names, 'output'])}"
                )
            self._after[where].append(i)
        between = any(hasattr(self.stages[i], "build") for where in names for i in self._after[where])
        probed = self._probe_channels() if between else {}  # only stages between blocks need it
        out = backbone_channels
        for where in ["input", *names, "output"]:
            c_in = 3 if where == "input" else out if where == "output" else probed.get(where, out)
            c = c_in
            for i in self._after[where]:
                stage = self.stages[i]
                c = stage.build(c) if hasattr(stage, "build") else c
            if where != "output" and c != c_in:
                raise ValueError(
                    f"a stage at {where!r} changes channels {c_in} -> {c}; only stages at "
                    "'output' may change the channel count"
                )
            if where == "output":
                out = c
        self.out_channels = out

    @torch.no_grad()
    def _probe_channels(self) -> dict[str, int]:
        x = torch.zeros(1, 3, self.probe_size, self.probe_size)  # (1, 3, P, P)
        channels = {}
        was_training = self.body.training
        self.body.eval()
        for name, block in self.body.named_children():
            x = block(x)
            channels[name] = x.shape[1]
        self.body.train(was_training)
        return channels

    def train(self, mode: bool = True) -> "ImageEncoder":
        """Keep frozen blocks (and their batch-norm statistics) in eval mode."""
        super().train(mode)
        for name, block in self.body.named_children():
            if name in self.frozen_blocks:
                block.eval()
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H_img, W_img)`` in ``[0, 1]`` -> normalised for the backbone's weights."""
        return (images - self.mean) / self.std

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H_img, W_img)`` in ``[0, 1]`` -> ``(B, D, H', W')`` before grid pooling."""
        x = self.normalize(images)
        for i in self._after["input"]:
            x = self.stages[i](x)
        body_input = tuple(x.shape[-2:])
        for name, block in self.body.named_children():
            x = block(x)
            for i in self._after[name]:
                x = self.stages[i](x)
        for i in self._after["output"]:
            x = self.stages[i](x)
        self._sizes = (body_input, tuple(x.shape[-2:]))  # for cell_edges
        return x

    def cell_edges(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Where the cells of the last forward pass's grid lie, at their receptive fields'
        centres (:mod:`captioner.encoders.receptive_field`), rather than as uniform tiles.

        Measured once per input size (0.05 s for EfficientNet-Lite0, 0.3 s for ResNet-101 at
        256 x 256, on the CPU) and kept.

        Returns:
            ``(ys (H + 1,), xs (W + 1,))`` cell boundaries, normalised (``-1`` to ``1``) across
            the backbone's input (the image, or the view of an ``"input"`` Spatial
            Transformer, which :meth:`grid_theta` then places), or ``None`` with a warning naming
            why they cannot be measured (a stage changed the feature map's size, a global
            operation, a view-moving stage on a feature map).

        Raises:
            RuntimeError: the encoder has not run yet.
        """
        from captioner.encoders.receptive_field import grid_cell_edges

        sizes = getattr(self, "_sizes", None)
        if sizes is None:
            raise RuntimeError("run the encoder on images before asking where its cells lie")
        cache = self.__dict__.setdefault("_cell_edges", {})
        if sizes not in cache:
            try:
                moving = [f"{type(self.stages[i]).__name__} at {where!r}"
                          for where, places in self._after.items() if where != "input"
                          for i in places if hasattr(self.stages[i], "input_theta")]
                if moving:  # its view would be composed in the wrong order with the geometry
                    raise ValueError(f"a stage moves the view of a feature map ({moving[0]}); "
                                     "receptive-field cells are placed for view-moving stages "
                                     "at 'input' only")
                cache[sizes] = grid_cell_edges(self.body, sizes[0], sizes[1], self.grid)
            except ValueError as e:
                warnings.warn(f"cells are drawn as uniform tiles of the image: {e}",
                              stacklevel=2)
                cache[sizes] = None
        return cache[sizes]

    def grid_theta(self) -> torch.Tensor | None:
        """Where the grid of the last forward pass looked in the image, or ``None``.

        Stages that move the view (a Spatial Transformer: any stage with an ``input_theta()``
        method returning ``(B, 1, 2, 3)``) sample their input at ``A [p; 1]`` for each output
        point ``p``; taken in the order they run, their composite ``A_1 A_2 ... A_n``
        (:func:`~captioner.encoders.stn.compose_thetas`) maps a normalised point of the
        attention grid to the normalised image point it shows (:mod:`captioner.grid_frame`).

        Returns:
            ``(B, 2, 3)``, or ``None`` when no stage moves the view (the grid lies on the
            image as it is).

        Raises:
            ValueError: a stage shows several views of one place (``n`` transformers
                concatenated on channels): a grid cell then looks at ``n`` places at once.
        """
        from captioner.encoders.stn import compose_thetas

        names = [name for name, _ in self.body.named_children()]
        thetas = []
        for where in ["input", *names, "output"]:
            for i in self._after[where]:
                stage = self.stages[i]
                if not hasattr(stage, "input_theta"):
                    continue
                theta = stage.input_theta()  # (B, n', 2, 3)
                if theta.shape[1] != 1:
                    raise ValueError(
                        f"stage {i} ({type(stage).__name__} at {where!r}) concatenates "
                        f"{theta.shape[1]} views on channels: each grid cell looks at "
                        f"{theta.shape[1]} places, so attention has no single place in the image"
                    )
                thetas.append(theta[:, 0])
        if not thetas:
            return None
        return compose_thetas(torch.stack(thetas, 1))  # (B, 2, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            images: ``(B, 3, H_img, W_img)`` RGB in ``[0, 1]``.

        Returns:
            Annotations ``(B, L, D)`` with ``L = H * W`` in row-major grid order.
        """
        x = self.pool(self.feature_map(images))  # (B, D, H, W)
        return x.flatten(2).transpose(1, 2)  # (B, L, D)


__all__ = ["ImageEncoder", "available_backbones"]
