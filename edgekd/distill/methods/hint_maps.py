"""Helpers shared by the feature-map methods (``fitnets``, ``at``, ``mgd``): picking and resampling maps.

Feature maps are 1-D, (B, C, L). When a student and a teacher map differ in length, the student's
(or both, for ``at``) is resampled along L: average pooling over equal windows when shortening (what
the networks' own pooling does), linear interpolation when lengthening.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgekd.distill.methods.base import ModelOutputs, ModelShape
from edgekd.errors import RecipeError


def resample(feature_map: torch.Tensor, length: int) -> torch.Tensor:
    """``feature_map`` (B, C, L) brought to (B, C, length): adaptive average pool down, linear up."""
    current = feature_map.shape[-1]
    if current == length:
        return feature_map
    if current > length:
        return F.adaptive_avg_pool1d(feature_map, length)
    return F.interpolate(feature_map, size=length, mode="linear", align_corners=False)


def require_maps(method: str, student: ModelShape, teacher: ModelShape) -> None:
    """Raise a one-line RecipeError when either model exposes no hint layers."""
    for role, shape in (("student", student), ("teacher", teacher)):
        if not shape.map_shapes:
            raise RecipeError(
                f"distill.method {method!r} matches intermediate feature maps, but the {role} model "
                "has no hint layers; choose a model with hint_layers or a logit/embedding method"
            )


def feature_maps(outputs: ModelOutputs, role: str, method: str) -> list[torch.Tensor]:
    """The maps of ``outputs``; a clear error if the caller did not request them."""
    if not outputs.feature_maps:
        raise ValueError(f"{method} needs the {role}'s feature maps, got None")
    return outputs.feature_maps
