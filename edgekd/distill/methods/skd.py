"""``skd``: signal knowledge distillation (the default method).

Hou, Li, Lin, Liang, Han, "ClST: A Convolutional Transformer Framework for Automatic Modulation
Recognition by Knowledge Distillation", IEEE Trans. Wireless Commun. 23(7):8013-8028, 2024
(arXiv:2312.17446). SKD trains the lightweight KD-CNN and KD-MobileNet students from the ClST teacher
with the teacher's temperature-softened outputs (soft targets) and a hybrid loss that keeps the
label supervision while also preserving the teacher's knowledge. By default edgekd
implements exactly those two terms (soft targets and the hybrid label loss).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgekd.distill.methods.base import (
    METHODS,
    DistillMethod,
    MethodOptions,
    ModelOutputs,
    ModelShape,
    label_ce,
    soft_kl,
)
from edgekd.recipe import DistillSpec


@METHODS.register("skd")
class SignalKD(DistillMethod):
    """Signal knowledge distillation (Hou et al., 2024): temperature-softened teacher outputs + labels.

    ``L = α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α) · CE(s, y)  [+ β · ‖n(W f_s + b) − n(f_t)‖²]``

    - s, t: student and teacher logits; T = ``distill.temperature``; α = ``distill.alpha``; batch mean.

    These two terms are what the ClST paper describes for SKD: the teacher's soft targets at a
    temperature, mixed with the hard-label loss in a hybrid loss. With the default
    ``distill.options.skd.beta`` = 0 that is the whole loss (the form of Hinton et al., 2015).

    The bracketed term is **edgekd's own extension, not in the paper**, off by default: with
    ``distill.options.skd.beta`` = β > 0, a FitNets-style hint (Romero et al., ICLR 2015) on the
    penultimate embeddings f_s, f_t through a learned linear connector ``W, b`` (student width to
    teacher width, trained with the student, dropped after training); n(v) = v / ‖v‖₂ per sample,
    so the term is 2 − 2·cos(W f_s + b, f_t), in [0, 4] whatever the embedding widths and scales.
    With β = 0 no connector is built and no features are requested.
    """

    class Options(MethodOptions):
        beta: float = Field(
            0.0,
            ge=0,
            description="edgekd's extension (not in the paper): weight of a cosine embedding hint; 0 = off",
        )

    def __init__(self, spec: DistillSpec, num_classes: int, student: ModelShape, teacher: ModelShape) -> None:
        super().__init__(spec, num_classes, student, teacher)
        self.needs_features = self.options.beta > 0
        self.connector = nn.Linear(self.student_dim, self.teacher_dim) if self.needs_features else None

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        teacher = self._teacher(teacher)
        alpha, beta = self.spec.alpha, self.options.beta
        total = alpha * soft_kl(student.logits, teacher.logits, self.spec.temperature)
        total = total + (1 - alpha) * label_ce(student.logits, target)
        if self.connector is None:
            return total
        if student.features is None or teacher.features is None:
            raise ValueError("skd with beta > 0 needs the student's and the teacher's features, got None")
        projected = F.normalize(self.connector(student.features), dim=1)
        reference = F.normalize(teacher.features.detach(), dim=1)
        return total + beta * (projected - reference).pow(2).sum(dim=1).mean()
