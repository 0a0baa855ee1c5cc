"""``dkd``: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022 (arXiv:2203.08679)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from edgekd.distill.methods.base import METHODS, DistillMethod, MethodOptions, ModelOutputs


def dkd_parts(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample TCKD and NCKD (each (B,), without the T² factor) of Zhao et al. (2022), eq. 1-4.

    With p = softmax(z / T) of either model and y the target class:

    - TCKD = KL(b_t ‖ b_s), b = (p_y, 1 − p_y) the binary target / non-target split;
    - NCKD = KL(p̃_t ‖ p̃_s), p̃ = softmax over the classes ≠ y (the target logit masked out).

    They decompose Hinton's term exactly: KL(p_t ‖ p_s) = TCKD + (1 − p_t,y) · NCKD. Every
    log-probability comes from log-softmax / logsumexp differences, so the parts stay finite for
    extreme logits. Teacher logits are detached.
    """
    s = student_logits / temperature
    t = teacher_logits.detach() / temperature
    is_target = F.one_hot(target, s.shape[1]).bool()
    s_masked = s.masked_fill(is_target, float("-inf"))
    t_masked = t.masked_fill(is_target, float("-inf"))
    s_all, t_all = torch.logsumexp(s, dim=1), torch.logsumexp(t, dim=1)
    s_rest, t_rest = torch.logsumexp(s_masked, dim=1), torch.logsumexp(t_masked, dim=1)
    # Binary split (log p_y, log(1 − p_y)) for each model: both entries finite for finite logits.
    log_b_s = torch.stack((s.gather(1, target[:, None]).squeeze(1) - s_all, s_rest - s_all), dim=1)
    log_b_t = torch.stack((t.gather(1, target[:, None]).squeeze(1) - t_all, t_rest - t_all), dim=1)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=1)
    # Non-target distributions: -inf at y; the target column is zeroed before it can meet 0 · inf.
    log_q_s = F.log_softmax(s_masked, dim=1)
    log_q_t = F.log_softmax(t_masked, dim=1)
    gap = torch.where(is_target, torch.zeros_like(log_q_s), log_q_t - log_q_s)
    nckd = (log_q_t.exp() * gap).sum(dim=1)
    return tckd, nckd


@METHODS.register("dkd", aliases=("decoupled-kd",))
class DecoupledKD(DistillMethod):
    """Decoupled KD (Zhao et al., CVPR 2022): Hinton's KL split into target and non-target parts.

    ``L = CE(s, y) + w(e) · T² · (α · TCKD + β · NCKD)``, batch mean, with

    - TCKD = KL(b_t ‖ b_s) on the binary split b = (p_y, 1 − p_y), p = softmax(z / T);
    - NCKD = KL(p̃_t ‖ p̃_s) on the softmax over the non-target classes (see :func:`dkd_parts`);
    - T = ``distill.temperature``; α = ``tckd_weight``, β = ``nckd_weight`` (CIFAR-100 defaults of
      the official mdistiller configs: 1 and 8 with T = 4); ``distill.alpha`` is not used (the
      label term has weight 1 as in the paper);
    - w(e) = min((e + 1) / (f · E), 1) the linear warm-up of the distillation weight over the first
      f · E of the E epochs (e 0-based). The official code warms up over 20 of 240 epochs; we keep
      that ratio, f = ``warmup_fraction`` = 20/240, so a 240-epoch run reproduces it exactly and a
      15-epoch run warms up over its first 1.25 epochs (w = 0.8, then 1). f = 0 disables warm-up.

    Labels are required on every row (DKD splits on the true class).
    """

    class Options(MethodOptions):
        tckd_weight: float = Field(1.0, ge=0, description="α: weight of the target-class term TCKD")
        nckd_weight: float = Field(8.0, ge=0, description="β: weight of the non-target-class term NCKD")
        warmup_fraction: float = Field(
            20 / 240,
            ge=0,
            le=1,
            description="share of the epochs over which the distillation weight ramps up linearly "
            "(paper: 20 of 240 epochs)",
        )

    def warmup_factor(self, state: dict[str, Any]) -> float:
        """w(e) = min((e + 1) / (f · E), 1)."""
        warmup_epochs = round(self.options.warmup_fraction * state["epochs"], 9)
        if warmup_epochs <= 0:
            return 1.0
        return min((state["epoch"] + 1) / warmup_epochs, 1.0)

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        teacher = self._teacher(teacher)
        temperature = self.spec.temperature
        tckd, nckd = dkd_parts(student.logits, teacher.logits, target, temperature)
        decoupled = (self.options.tckd_weight * tckd + self.options.nckd_weight * nckd).mean()
        ce = F.cross_entropy(student.logits, target)
        return ce + self.warmup_factor(state) * temperature**2 * decoupled
