"""Model registry: every architecture edgekd can build, by name.

Names are ``edgekd:<name>`` for our own architectures (see :mod:`edgekd.models.radio`: IQ frames
(B, in_channels, L)) and ``timm:<name>`` for timm's image classifiers (see
:mod:`edgekd.models.timm_models`: images (B, in_channels, H, W)). Every model maps its inputs to
logits (B, num_classes) and exposes ``forward_features``, ``head``, ``feature_dim`` and
``hint_layers`` (the interface distillation methods rely on), and ``input_rank``, the number of
axes of one input.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from edgekd.errors import ModelError
from edgekd.models.radio import CNN, KDCNN, ClST, KDMobileNet
from edgekd.models.timm_models import PREFIX as TIMM_PREFIX
from edgekd.models.timm_models import TimmClassifier, check_timm_name
from edgekd.registry import Registry

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model", error=ModelError)
MODELS.register("edgekd:clst")(ClST)
MODELS.register("edgekd:kd-cnn")(KDCNN)
MODELS.register("edgekd:kd-mobilenet")(KDMobileNet)
MODELS.register("edgekd:cnn")(CNN)

__all__ = [
    "CNN",
    "KDCNN",
    "MODELS",
    "ClST",
    "KDMobileNet",
    "TimmClassifier",
    "build_model",
    "model_factory",
]

_INPUT_KINDS = {2: "IQ frames (C, L)", 3: "images (C, H, W)"}


def model_factory(name: str) -> ModelFactory:
    """The constructor of ``name``; a one-line ModelError for unknown names (with close matches)."""
    if name.startswith(TIMM_PREFIX):
        return partial(TimmClassifier, check_timm_name(name))
    return MODELS.get(name)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 2,
    pretrained: bool = False,
    role: str = "model",
    input_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """A model ``name`` for ``num_classes`` classes and ``in_channels`` inputs, freshly initialised.

    ``pretrained`` starts a timm model from the hub's weights (``role``, e.g. "teacher", names the
    recipe section in error messages). With ``input_shape`` (one sample's shape), a model built for
    another kind of input (images vs IQ frames) is a ModelError. Raises :class:`ModelError` for an
    unknown name (with a close match), non-positive sizes, or pretrained weights that cannot be had.
    """
    factory = model_factory(name)
    if num_classes < 1 or in_channels < 1:
        raise ModelError(
            f"model {name!r}: num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}"
        )
    if pretrained and not name.startswith(TIMM_PREFIX):
        raise ModelError(f"model {name!r} has no pretrained weights; set {role}.pretrained: false")
    extra = {"pretrained": True, "role": role} if pretrained else {}
    model = factory(num_classes=num_classes, in_channels=in_channels, **extra)
    rank = getattr(model, "input_rank", None)
    if input_shape is not None and rank is not None and rank != len(input_shape):
        raise ModelError(
            f"{role} {name!r} takes {_INPUT_KINDS.get(rank, f'{rank}-axis inputs')}, but the dataset "
            f"gives inputs of shape {tuple(input_shape)}; choose a model for "
            f"{_INPUT_KINDS.get(len(input_shape), 'these inputs')} or another dataset"
        )
    return model
