"""Encoder stages: the lazily built base class and a registry of stage names.

A *stage* is an ``nn.Module`` that :class:`captioner.encoders.ImageEncoder` places in the network
(see the contract in :mod:`captioner.encoders.encoder`):

* ``where``: ``"input"`` (the normalised image, before the backbone), the name of a backbone
  block (after that block, e.g. ``"layer3"`` of a ResNet, ``"conv2"`` of ``shapes_cnn``) or
  ``"output"`` (after the backbone, before grid pooling);
* ``build(in_channels) -> out_channels``: called once by the encoder with the channel count ``C``
  at that place, so YAML never repeats channel counts; parameters are created there;
* ``forward``: ``(B, C, h, w) -> (B, C', h', w')``; only a stage at ``"output"`` may have
  ``C' != C``.

Constructors take hyper-parameters only, typed, so LightningCLI configures a stage in YAML::

    encoder:
      class_path: captioner.encoders.ImageEncoder
      init_args:
        backbone: resnet50
        stages:
          - class_path: captioner.encoders.stn.SpatialTransformer
            init_args: {where: input, transform: affine}
          - class_path: captioner.encoders.non_local.NonLocalBlock
            init_args: {where: layer3}

For direct use a stage also accepts ``in_channels`` and is then built at once. YAML names a stage
by its ``class_path``, so a new stage is one class in one file of any package, with no other
edit. The registry here only gives short names for Python use (``build_stage("non_local",
where="layer3")``; imported on first use, so this module imports no stage); :func:`register_stage`
adds one.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from captioner.config import import_class

_REGISTRY: dict[str, str] = {
    "spatial_transformer": "captioner.encoders.stn.SpatialTransformer",
    "non_local": "captioner.encoders.non_local.NonLocalBlock",
}


class EncoderStage(nn.Module):
    """Base class of the built-in stages: remembers ``where`` and builds exactly once.

    Subclasses implement :meth:`_build` (create parameters for ``C`` input channels and return
    the output channel count).

    Args:
        where: ``"input"``, ``"output"`` or a backbone block name.
        in_channels: ``C``; when given the stage is built immediately (direct use).
    """

    def __init__(self, where: str, in_channels: int | None = None) -> None:
        super().__init__()
        self.where = where
        self.in_channels: int | None = None
        self.out_channels: int | None = None
        self._pending = in_channels

    def _build_pending(self) -> None:
        """Subclasses call this at the end of ``__init__`` (hyper-parameters set by then)."""
        if self._pending is not None:
            self.build(self._pending)

    def build(self, in_channels: int) -> int:
        """Create the parameters for ``in_channels`` channels (once) and return ``C'``.

        Calling it again with the same count is a no-op (a stage built by hand keeps its
        weights when handed to an encoder).

        Raises:
            ValueError: built before for another channel count, or ``in_channels < 1``.
        """
        if self.in_channels is not None:
            if in_channels != self.in_channels:
                raise ValueError(
                    f"{type(self).__name__} was built for {self.in_channels} channels but is "
                    f"placed at {self.where!r} where there are {in_channels}"
                )
            assert self.out_channels is not None
            return self.out_channels
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        self.out_channels = self._build(in_channels)
        self.in_channels = in_channels
        return self.out_channels

    def _build(self, in_channels: int) -> int:
        raise NotImplementedError

    def _check_built(self) -> None:
        if self.in_channels is None:
            raise RuntimeError(
                f"{type(self).__name__} is not built: pass in_channels=... or call build(C) "
                "(ImageEncoder does this for its stages)"
            )

    def extra_repr(self) -> str:
        return f"where={self.where!r}, in_channels={self.in_channels}"


def register_stage(name: str, class_path: str) -> None:
    """Make ``class_path`` (``"package.module.Class"``) available as ``name``."""
    _REGISTRY[name] = class_path


def available_stages() -> list[str]:
    """Names accepted by :func:`build_stage`."""
    return sorted(_REGISTRY)


def stage_class(name: str) -> type[nn.Module]:
    """The class registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown stage {name!r}; available: {', '.join(available_stages())}")
    return import_class(_REGISTRY[name])


def build_stage(name: str, **hparams: Any) -> nn.Module:
    """Instantiate a registered stage, e.g. ``build_stage("non_local", where="layer3")``."""
    return stage_class(name)(**hparams)


__all__ = ["EncoderStage", "available_stages", "build_stage", "register_stage", "stage_class"]
