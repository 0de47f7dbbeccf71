"""Image and text encoders producing annotation vectors ``(B, L, D)``."""

from captioner.encoders.backbone import available_backbones, build_backbone
from captioner.encoders.encoder import ImageEncoder

__all__ = ["ImageEncoder", "available_backbones", "build_backbone"]
