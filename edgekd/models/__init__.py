"""Model registry: ``edgekd:<name>`` architectures, built for a dataset's classes and channels."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from edgekd.errors import ModelError
from edgekd.models.radio import CNN, KDCNN, ClST, KDMobileNet
from edgekd.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", error=ModelError)
MODELS.register("edgekd:clst")(ClST)
MODELS.register("edgekd:kd-cnn")(KDCNN)
MODELS.register("edgekd:kd-mobilenet")(KDMobileNet)
MODELS.register("edgekd:cnn")(CNN)


def build_model(name: str, num_classes: int, in_channels: int = 2) -> nn.Module:
    """A freshly initialised model ``name`` with ``num_classes`` outputs."""
    if name.startswith("timm:"):
        raise ModelError(
            f"model {name!r}: timm models are not supported for this task yet; "
            f"use one of {', '.join(MODELS.names())}"
        )
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels)
