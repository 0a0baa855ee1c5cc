"""Helpers shared by the feature-map methods (``fitnets``, ``at``, ``mgd``): picking, resampling, connectors.

Feature maps are 1-D, (B, C, L) (IQ-frame models), or 2-D, (B, C, H, W) (image models); a model's
map shapes in :class:`ModelShape` are (C, L) or (C, H, W). When a student and a teacher map differ
in size, the student's (or both, for ``at``) is resampled along the spatial axes: average pooling
over equal windows when shrinking (what the networks' own pooling does), (bi)linear interpolation
when enlarging. Connectors are Conv1d/BatchNorm1d or Conv2d/BatchNorm2d, following the map rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.distill.methods.base import ModelOutputs, ModelShape
from edgekd.errors import RecipeError

_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d}
_INTERPOLATION = {1: "linear", 2: "bilinear"}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


def resample(feature_map: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``feature_map`` (B, C, *S) brought to (B, C, *size): adaptive average pool down, (bi)linear up.

    Each spatial axis is first pooled to ``min(current, wanted)``, then whatever is still too small
    is interpolated, so an axis that shrinks and another that grows are both handled.
    """
    size = tuple(int(s) for s in size)
    current = tuple(feature_map.shape[2:])
    if current == size:
        return feature_map
    rank = len(size)
    smaller = tuple(min(c, s) for c, s in zip(current, size, strict=True))
    if smaller != current:
        feature_map = _POOL[rank](feature_map, smaller)
    if smaller != size:
        feature_map = F.interpolate(feature_map, size=size, mode=_INTERPOLATION[rank], align_corners=False)
    return feature_map


def conv(shape: Sequence[int], in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> nn.Module:
    """A Conv1d for (C, L) maps or a Conv2d for (C, H, W) maps (``shape`` is one map's shape)."""
    return _CONV[len(shape) - 1](in_channels, out_channels, kernel_size, **kwargs)


def batch_norm(shape: Sequence[int], channels: int) -> nn.Module:
    """A BatchNorm1d for (C, L) maps or a BatchNorm2d for (C, H, W) maps."""
    return _BATCH_NORM[len(shape) - 1](channels)


def require_maps(method: str, student: ModelShape, teacher: ModelShape) -> None:
    """Raise a one-line RecipeError when either model exposes no hint layers or the map ranks differ."""
    for role, shape in (("student", student), ("teacher", teacher)):
        if not shape.map_shapes:
            raise RecipeError(
                f"distill.method {method!r} matches intermediate feature maps, but the {role} model "
                "has no hint layers; choose a model with hint_layers or a logit/embedding method"
            )
    ranks = {len(shape) for model in (student, teacher) for shape in model.map_shapes}
    if len(ranks) != 1 or next(iter(ranks)) - 1 not in _CONV:
        raise RecipeError(
            f"distill.method {method!r} needs feature maps shaped (C, L) or (C, H, W), the same for both "
            f"models; got student {list(student.map_shapes)}, teacher {list(teacher.map_shapes)}; "
            "choose a logit/embedding method"
        )


def feature_maps(outputs: ModelOutputs, role: str, method: str) -> list[torch.Tensor]:
    """The maps of ``outputs``; a clear error if the caller did not request them."""
    if not outputs.feature_maps:
        raise ValueError(f"{method} needs the {role}'s feature maps, got None")
    return outputs.feature_maps
