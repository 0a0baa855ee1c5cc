"""``pld``: Bassam, Zhu, Bian, "PLD: A Choice-Theoretic List-Wise Knowledge Distillation",
NeurIPS 2025, arXiv:2506.12542."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from edgekd.distill.methods.base import METHODS, DistillMethod, MethodOptions, ModelOutputs


def plackett_luce_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, tau: float
) -> torch.Tensor:
    """PLD loss, batch mean: teacher-weighted Plackett-Luce negative log-likelihood of the ranking
    "true label first, then the other classes by descending teacher logit".

    Implemented as in the paper's Appendix C: classes in ascending teacher order with the label
    moved last, so a prefix log-sum-exp (``logcumsumexp``) of the student logits is the suffix
    log-sum-exp of the descending ranking.
    """
    teacher = teacher_logits.detach()
    # Sort key: the teacher logit, +inf for the label, so the label is ranked first (last ascending).
    key = teacher.scatter(1, target.unsqueeze(1), float("inf"))
    ascending = torch.sort(key, dim=1, stable=True).indices
    student_perm = student_logits.gather(1, ascending)
    weights = F.softmax(teacher / tau, dim=1).gather(1, ascending)
    per_position = torch.logcumsumexp(student_perm, dim=1) - student_perm
    return (weights * per_position).sum(dim=1).mean()


@METHODS.register("pld", aliases=("plackett-luce",))
class PlackettLuceKD(DistillMethod):
    """Plackett-Luce distillation (Bassam, Zhu & Bian, NeurIPS 2025, arXiv:2506.12542).

    With π* the teacher-optimal permutation of one sample (π*₁ = y, then the other classes by
    descending teacher logit) and α_k = softmax(t/τ)_{π*_k} the teacher's probability of the class
    ranked k (α₁ = teacher probability of the true label):

    ``L = Σ_{k=1..C} α_k · [ log Σ_{l=k..C} exp(s_{π*_l}) − s_{π*_k} ]``, batch mean.

    The k = 1 term is α₁ · CE(s, y): with a one-hot teacher PLD is cross-entropy, with uniform α it
    is ListMLE. PLD is used alone — it replaces both the label and the distillation term, so
    ``distill.temperature`` and ``distill.alpha`` are not used. The student logits are not scaled.
    Options: ``tau`` (teacher softmax temperature; 1.0 is the paper's default and its best
    ImageNet value, 4.0 its CIFAR-100 setting). Needs every sample labelled.
    """

    class Options(MethodOptions):
        tau: float = Field(1.0, gt=0, description="temperature of the teacher softmax giving the weights")

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        teacher = self._teacher(teacher)
        if bool((target < 0).any()):
            raise ValueError("pld needs a label for every sample (the label is ranked first)")
        return plackett_luce_loss(student.logits, teacher.logits, target, self.options.tau)
