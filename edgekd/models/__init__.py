"""Model registry: every architecture edgekd can build, by name.

Names are ``edgekd:<name>`` for our own architectures (see :mod:`edgekd.models.radio`). Every model
maps IQ frames (B, in_channels, L) to logits (B, num_classes) and exposes ``forward_features``,
``head`` and ``feature_dim`` (the interface distillation methods rely on).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from edgekd.errors import ModelError
from edgekd.models.radio import CNN, KDCNN, ClST, KDMobileNet
from edgekd.registry import Registry

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model", error=ModelError)
MODELS.register("edgekd:clst")(ClST)
MODELS.register("edgekd:kd-cnn")(KDCNN)
MODELS.register("edgekd:kd-mobilenet")(KDMobileNet)
MODELS.register("edgekd:cnn")(CNN)

__all__ = ["CNN", "KDCNN", "MODELS", "ClST", "KDMobileNet", "build_model", "model_factory"]


def model_factory(name: str) -> ModelFactory:
    """The constructor registered as ``name``; a one-line ModelError for unknown or timm names."""
    if name.startswith("timm:"):
        raise ModelError(
            f"model {name!r}: timm models are not supported yet for this task (IQ signal frames); "
            f"use one of: {', '.join(MODELS.names())}"
        )
    return MODELS.get(name)


def build_model(name: str, num_classes: int, in_channels: int = 2) -> nn.Module:
    """A freshly initialised model ``name`` for ``num_classes`` classes and ``in_channels`` inputs.

    Raises :class:`ModelError` for an unknown name (listing the known ones, with a close match),
    for ``timm:`` names (not supported for this task yet) and for non-positive sizes.
    """
    factory = model_factory(name)
    if num_classes < 1 or in_channels < 1:
        raise ModelError(
            f"model {name!r}: num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}"
        )
    return factory(num_classes=num_classes, in_channels=in_channels)
