"""``fitnets``: Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets",
ICLR 2015 (arXiv:1412.6550)."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgekd.distill.methods.base import METHODS, DistillMethod, MethodOptions, ModelOutputs, ModelShape
from edgekd.distill.methods.hint_maps import batch_norm, conv, feature_maps, require_maps, resample
from edgekd.errors import RecipeError
from edgekd.recipe import DistillSpec


def layer_index(choice: str | int, count: int, method: str, role: str) -> int:
    """Index of the hint layer ``choice`` ("first", "middle" = count // 2, "last", or a Python index)."""
    named = {"first": 0, "middle": count // 2, "last": count - 1}
    if isinstance(choice, str):
        return named[choice]
    if not -count <= choice < count:
        raise RecipeError(
            f"distill.options.{method}.hint_layer: index {choice} out of range "
            f"for the {role}'s {count} hint layers"
        )
    return choice % count


@METHODS.register("fitnets", aliases=("fitnet", "hint"))
class FitNets(DistillMethod):
    """FitNets hints (Romero et al., ICLR 2015), trained in one stage with the label loss.

    ``L = CE(s, y) + λ · mean((r(R(F_s)) − F_t)²)``

    - F_s: the student's guided layer, F_t: the teacher's hint layer — the maps (B, C, L) or
      (B, C, H, W) of the hint layers picked by ``hint_layer`` (default the middle one of each
      model, RepDistiller's choice; "first", "last" or an index also work);
    - R: resampling of the student map to the teacher's size when they differ (adaptive average
      pooling to shrink, (bi)linear interpolation to enlarge);
    - r: the regressor Conv(C_s, C_t, kernel 3, padding 1) + BatchNorm (1-D or 2-D, as the maps),
      RepDistiller's ConvReg for equal spatial sizes without its final ReLU: the teacher's ClST
      stage maps are residual-stream tokens with negative values, which a ReLU output could never
      match. It is trained with the student and dropped after training;
    - λ = ``hint_weight`` (100, the one-stage RepDistiller setting); mean over all elements
      (``nn.MSELoss``), teacher map detached.

    The paper trains in two stages (hints first, then Hinton KD); we use the one-stage variant of
    the RepDistiller benchmark (Tian et al., ICLR 2020), which adds the hint to the label loss.
    ``distill.temperature`` and ``distill.alpha`` are not used.
    """

    needs_feature_maps = True

    class Options(MethodOptions):
        hint_weight: float = Field(100.0, ge=0, description="λ: weight of the hint (MSE) term")
        hint_layer: Literal["first", "middle", "last"] | int = Field(
            "middle", description="which hint layer of each model is matched: first, middle, last or an index"
        )

    def __init__(self, spec: DistillSpec, num_classes: int, student: ModelShape, teacher: ModelShape) -> None:
        super().__init__(spec, num_classes, student, teacher)
        require_maps(spec.method, student, teacher)
        choice = self.options.hint_layer
        self.student_layer = layer_index(choice, len(student.map_shapes), spec.method, "student")
        self.teacher_layer = layer_index(choice, len(teacher.map_shapes), spec.method, "teacher")
        student_channels = student.map_shapes[self.student_layer][0]
        teacher_shape = teacher.map_shapes[self.teacher_layer]
        self.regressor = nn.Sequential(
            conv(teacher_shape, student_channels, teacher_shape[0], kernel_size=3, padding=1),
            batch_norm(teacher_shape, teacher_shape[0]),
        )

    def hint_loss(self, student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        """mean((r(R(F_s)) − F_t)²) for one pair of maps."""
        teacher_map = teacher_map.detach()
        guided = self.regressor(resample(student_map, teacher_map.shape[2:]))
        return F.mse_loss(guided, teacher_map)

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        teacher = self._teacher(teacher)
        name = type(self).__name__
        student_map = feature_maps(student, "student", name)[self.student_layer]
        teacher_map = feature_maps(teacher, "teacher", name)[self.teacher_layer]
        ce = F.cross_entropy(student.logits, target)
        return ce + self.options.hint_weight * self.hint_loss(student_map, teacher_map)
