"""``skd``: signal knowledge distillation — Hou, Li, Lin, Liang, Han, "ClST: A Convolutional Transformer
Framework for Automatic Modulation Recognition by Knowledge Distillation", IEEE TWC 23(7), 2024
(arXiv:2312.17446)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.distill.methods.base import METHODS, DistillMethod, ModelOutputs, soft_kl
from edgekd.recipe import DistillSpec


@METHODS.register("skd")
class SignalKD(DistillMethod):
    """Soft targets plus a term that keeps the teacher's signal representation in the student.

    SKD trains the lightweight students with the teacher's temperature-softened outputs and a
    hybrid loss that also preserves the teacher's knowledge beyond its output distribution. We
    realise the preserving term on the penultimate embedding: the student's embedding passes a
    learned linear connector to the teacher's width and is matched to the (frozen) teacher
    embedding after L2 normalisation, so the term is scale-free across architectures:

    ``L = α · T² · KL(p_t^T ‖ p_s^T) + (1 − α) · CE(s, y) + β · ‖n(W f_s) − n(f_t)‖²``

    with ``n`` the L2 normalisation and β = ``distill.beta``. At β = 0 this is Hinton KD.
    """

    needs_features = True

    def __init__(self, spec: DistillSpec, num_classes: int, student_dim: int, teacher_dim: int) -> None:
        super().__init__(spec, num_classes, student_dim, teacher_dim)
        self.connector = nn.Linear(student_dim, teacher_dim, bias=False)

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        assert teacher is not None and student.features is not None and teacher.features is not None
        alpha, temperature, beta = self.spec.alpha, self.spec.temperature, self.spec.beta
        soft = soft_kl(student.logits, teacher.logits, temperature)
        hard = F.cross_entropy(student.logits, target)
        projected = F.normalize(self.connector(student.features), dim=1)
        reference = F.normalize(teacher.features.detach(), dim=1)
        knowledge = (projected - reference).pow(2).sum(dim=1).mean()
        return alpha * soft + (1 - alpha) * hard + beta * knowledge
