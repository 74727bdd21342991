"""The network: backbones (by name from a registry), image pyramid, neck and two heads.

    from instance_embed.model import ModelConfig, build_model
    model = build_model(ModelConfig(backbone="light", num_classes=3))
    outputs = model(images)  # {"embeddings": [B,h,w,d], "class_logits": [B,h,w,T,C+1]}
"""

from instance_embed.model.backbones import (
    BackboneSpec,
    available_backbones,
    get_backbone,
    register_backbone,
)
from instance_embed.model.builder import build_backbone, build_model
from instance_embed.model.config import ModelConfig, feature_size

__all__ = [
    "BackboneSpec",
    "ModelConfig",
    "available_backbones",
    "build_backbone",
    "build_model",
    "feature_size",
    "get_backbone",
    "register_backbone",
]
