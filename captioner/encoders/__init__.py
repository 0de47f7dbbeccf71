"""Image and text encoders producing annotation vectors ``(B, L, D)``, and encoder stages."""

from captioner.encoders.backbone import available_backbones, build_backbone
from captioner.encoders.encoder import ImageEncoder
from captioner.encoders.non_local import NonLocalBlock
from captioner.encoders.stages import EncoderStage, available_stages, build_stage, register_stage
from captioner.encoders.stn import SpatialTransformer

__all__ = ["EncoderStage", "ImageEncoder", "NonLocalBlock", "SpatialTransformer",
           "available_backbones", "available_stages", "build_backbone", "build_stage",
           "register_stage"]
