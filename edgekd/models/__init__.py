"""Model registry: every architecture edgekd can build, by name.

Names are ``edgekd:<name>`` for our own architectures (see :mod:`edgekd.models.radio`: IQ frames
(B, in_channels, L)), ``timm:<name>`` for timm's image classifiers (see
:mod:`edgekd.models.timm_models`: images (B, in_channels, H, W)), the user's own models
``py:FILE.py:FACTORY``, ``package.module:FACTORY`` and ``torchvision:<name>`` (see
:mod:`edgekd.models.sources`), and ``onnx:FILE.onnx``, a teacher run by ONNX Runtime (see
:mod:`edgekd.models.onnx_teacher`). Every model maps its inputs to
logits (B, num_classes) and exposes ``forward_features``, ``head``, ``feature_dim`` and
``hint_layers`` (the interface distillation methods rely on), and ``input_rank``, the number of
axes of one input.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from edgekd.errors import ModelError, RecipeError
from edgekd.models.detr import FACTORIES as DETR_FACTORIES
from edgekd.models.radio import CNN, KDCNN, ClST, KDMobileNet
from edgekd.models.sources import build_user_model, is_onnx, is_user_source, model_source_files, onnx_path
from edgekd.models.sources import source_factory as _source_factory
from edgekd.models.timm_models import PREFIX as TIMM_PREFIX
from edgekd.models.timm_models import TimmClassifier, check_timm_name
from edgekd.registry import Registry

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model", error=ModelError)
MODELS.register("edgekd:clst")(ClST)
MODELS.register("edgekd:kd-cnn")(KDCNN)
MODELS.register("edgekd:kd-mobilenet")(KDMobileNet)
MODELS.register("edgekd:cnn")(CNN)
for _name, _factory in DETR_FACTORIES.items():  # detection: they build only with task="detection"
    MODELS.register(_name)(_factory)

__all__ = [
    "CNN",
    "KDCNN",
    "MODELS",
    "ClST",
    "KDMobileNet",
    "TimmClassifier",
    "build_model",
    "model_factory",
    "model_source_files",
]

_INPUT_KINDS = {2: "IQ frames (C, L)", 3: "images (C, H, W)"}


def model_factory(name: str) -> ModelFactory:
    """The constructor of ``name``; a one-line ModelError for unknown names (with close matches)."""
    if name.startswith(TIMM_PREFIX):
        return partial(TimmClassifier, check_timm_name(name))
    if is_onnx(name):
        from edgekd.models.onnx_teacher import OnnxTeacher

        return partial(OnnxTeacher, onnx_path(name))
    if is_user_source(name):
        return _source_factory(name)
    return MODELS.get(name)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 2,
    pretrained: bool = False,
    role: str = "model",
    input_shape: tuple[int, ...] | None = None,
    kwargs: dict[str, Any] | None = None,
    hint_layers: list[str] | None = None,
) -> nn.Module:
    """A model ``name`` for ``num_classes`` classes and ``in_channels`` inputs, freshly initialised.

    ``pretrained`` starts a timm or torchvision model from the hub's weights (``role``, e.g.
    "teacher", names the recipe section in error messages). ``kwargs`` go to the model's factory
    (``teacher.kwargs``); ``hint_layers`` names the modules feature-map methods use (default: the
    model's own, or found automatically for user models). With ``input_shape`` (one sample's shape),
    a model built for another kind of input (images vs IQ frames) is a ModelError, and user models
    and ONNX teachers are checked on a probe input. Raises :class:`ModelError` for an unknown name
    (with a close match), non-positive sizes, or pretrained weights that cannot be had.
    """
    if num_classes < 1 or in_channels < 1:
        raise ModelError(
            f"model {name!r}: num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}"
        )
    if is_onnx(name):
        if pretrained or kwargs or hint_layers:
            raise ModelError(
                f"{role} {name!r}: an ONNX model is used as it is; remove {role}.pretrained, "
                f"{role}.kwargs and {role}.hint_layers"
            )
        from edgekd.models.onnx_teacher import OnnxTeacher

        return OnnxTeacher(onnx_path(name), num_classes, input_shape, role)
    if is_user_source(name):
        return build_user_model(
            name, num_classes, in_channels, pretrained, role, input_shape, kwargs, hint_layers
        )
    factory = model_factory(name)
    if pretrained and not name.startswith(TIMM_PREFIX):
        raise ModelError(f"model {name!r} has no pretrained weights; set {role}.pretrained: false")
    extra = {"pretrained": True, "role": role} if pretrained else {}
    try:
        model = factory(num_classes=num_classes, in_channels=in_channels, **extra, **(kwargs or {}))
    except TypeError as exc:
        if not kwargs:
            raise
        raise ModelError(f"{role} {name!r} does not take {role}.kwargs {sorted(kwargs)} ({exc})") from None
    if hint_layers is not None:
        model.hint_layers = _check_hint_layers(model, name, hint_layers, role)
    rank = getattr(model, "input_rank", None)
    if input_shape is not None and rank is not None and rank != len(input_shape):
        raise ModelError(
            f"{role} {name!r} takes {_INPUT_KINDS.get(rank, f'{rank}-axis inputs')}, but the dataset "
            f"gives inputs of shape {tuple(input_shape)}; choose a model for "
            f"{_INPUT_KINDS.get(len(input_shape), 'these inputs')} or another dataset"
        )
    return model


def _check_hint_layers(model: nn.Module, name: str, hint_layers: list[str], role: str) -> tuple[str, ...]:
    """``hint_layers`` when each names a module of ``model``; a one-line RecipeError with close names."""
    modules = [path for path, _ in model.named_modules() if path]
    for layer in hint_layers:
        if layer not in modules:
            close = difflib.get_close_matches(layer, modules, n=5, cutoff=0.4)
            shown = close or [path for path, _ in model.named_children()][:5]
            raise RecipeError(
                f"{role}.hint_layers: {layer!r} is not a module of {name}; "
                f"{'close names' if close else 'its top-level modules'}: {', '.join(shown)}"
            )
    return tuple(hint_layers)
