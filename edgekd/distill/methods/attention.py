"""``at``: Zagoruyko, Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017 (arXiv:1612.03928)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from edgekd.distill.methods.base import METHODS, DistillMethod, MethodOptions, ModelOutputs, ModelShape
from edgekd.distill.methods.hint_maps import feature_maps, require_maps, resample
from edgekd.recipe import DistillSpec


def attention_map(feature_map: torch.Tensor, p: float, size: Sequence[int]) -> torch.Tensor:
    """Q = n(R(mean_c |A_c|^p)): (B, C, *S) -> (B, prod(size)), L2-normalised per sample.

    R resamples the map to ``size`` (L, or H and W; adaptive average pooling when shrinking).
    Normalising makes Q independent of the scale of A: Q(k·A) = Q(A) for any k > 0.
    """
    spatial = feature_map.abs().pow(p).mean(dim=1, keepdim=True)
    return F.normalize(resample(spatial, size).flatten(1), dim=1)


@METHODS.register("at", aliases=("attention",))
class AttentionTransfer(DistillMethod):
    """Activation-based attention transfer (Zagoruyko & Komodakis, ICLR 2017), plus the label loss.

    ``L = CE(s, y) + β · Σ_j mean_{b,l}( (Q_s^j − Q_t^j)² )``

    - the pairs j are the last k hint layers of student and teacher, deepest with deepest,
      k = min(``layers``, number of hint layers of each model) (the paper pairs the outputs of
      matching residual groups; here the deepest k stages);
    - Q = A / ‖A‖₂ per sample with A = mean over channels of |F|^p (F a (B, C, L) or (B, C, H, W)
      map, p = ``p``); both maps of a pair are first brought to the smaller of their two sizes
      (per axis) by average pooling,
      so channel counts and lengths need not match; no trainable part;
    - β = ``beta`` = 1000, applied as written: the authors' code (szagoruyko/attention-transfer,
      ``cifar.py``: ``opt.beta * sum(at_loss(x, y) ...)`` with ``at_loss = (at(x) − at(y)).pow(2).mean()``,
      β = 1e3 in its README) and mdistiller (megvii-research/mdistiller, ``distillers/AT.py``,
      ``FEAT_WEIGHT`` 1000 times the sum of the per-stage means) both weight the summed per-layer
      means by β, without the β/2 of the paper's equation.

    ``distill.temperature`` and ``distill.alpha`` are not used; teacher maps are detached.
    """

    needs_feature_maps = True

    class Options(MethodOptions):
        beta: float = Field(1000.0, ge=0, description="β: weight of the summed per-layer attention terms")
        p: float = Field(2.0, ge=1, description="exponent of the attention map mean_c |F|^p")
        layers: int = Field(
            3, ge=1, description="number of deepest hint layers paired (at most the models have)"
        )

    def __init__(self, spec: DistillSpec, num_classes: int, student: ModelShape, teacher: ModelShape) -> None:
        super().__init__(spec, num_classes, student, teacher)
        require_maps(spec.method, student, teacher)
        self.pairs = min(self.options.layers, len(student.map_shapes), len(teacher.map_shapes))

    def attention_loss(
        self, student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]
    ) -> torch.Tensor:
        """β · Σ_j mean((Q_s^j − Q_t^j)²) over the last ``pairs`` maps of each list."""
        total = student_maps[-1].new_zeros(())
        for student_map, teacher_map in zip(
            student_maps[-self.pairs :], teacher_maps[-self.pairs :], strict=True
        ):
            size = [min(s, t) for s, t in zip(student_map.shape[2:], teacher_map.shape[2:], strict=True)]
            q_s = attention_map(student_map, self.options.p, size)
            q_t = attention_map(teacher_map.detach(), self.options.p, size)
            total = total + (q_s - q_t).pow(2).mean()
        return self.options.beta * total

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        teacher = self._teacher(teacher)
        name = type(self).__name__
        maps_s = feature_maps(student, "student", name)
        maps_t = feature_maps(teacher, "teacher", name)
        return F.cross_entropy(student.logits, target) + self.attention_loss(maps_s, maps_t)
