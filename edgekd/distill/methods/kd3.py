"""``kd3``: Tang, Chen, Niu, Sugiyama, Gong, "Distribution Shift Matters for Knowledge Distillation
with Webly Collected Images", ICCV 2023 (arXiv:2307.11469)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from edgekd.distill.methods.base import METHODS, DistillMethod, MethodOptions, ModelOutputs, label_ce


@METHODS.register("kd3")
class DynamicSelectionKD(DistillMethod):
    """KD³-style dynamic instance selection (after Tang et al., ICCV 2023): distil only where the
    combined teacher + student prediction is confident.

    ``p_c = λ · softmax(t) + (1 − λ) · sg(softmax(s))``,  ``w_i = m_i · 1[m_i ≥ θ]``,  ``m_i = max_k p_c,ik``,
    ``λ = 1 − (1 − λ_end) · step / (steps − 1)``

    ``L = α · Σ_i w_i · T² · KL(softmax(t_i/T) ‖ softmax(s_i/T)) / Σ_i w_i + (1 − α) · CE(s, y)``

    - sg: stop-gradient (the selection is a constant to the loss); λ falls linearly from 1 (the
      teacher alone) at the first step to ``lambda_end`` at the last, so the student's own
      prediction gains weight as it improves; θ = ``threshold``;
    - the KD term is the w-weighted mean over the selected rows (0 when none is selected); the
      label term uses every labelled row (our setting has the true labels, the paper's web data
      does not); T = ``distill.temperature``, α = ``distill.alpha``.

    Only the paper's instance selection is implemented (not its feature/classifier alignment or
    MixDistribution). The paper's selection is "according to the combined predictions of teacher
    and student"; the exact equation above (linear λ schedule, confidence threshold and weighting)
    is our reconstruction.
    """

    supports_missing_labels = True

    class Options(MethodOptions):
        lambda_end: float = Field(
            0.5, ge=0, le=1, description="teacher share λ of the combined prediction at the end"
        )
        threshold: float = Field(
            0.5, ge=0, le=1, description="keep a sample for KD when its combined max probability reaches this"
        )

    def teacher_share(self, state: dict[str, Any]) -> float:
        """λ at ``state['step']`` of ``state['steps']``: 1 at the first step, ``lambda_end`` at the last."""
        steps = int(state.get("steps", 1))
        progress = min(max(int(state.get("step", 0)) / max(steps - 1, 1), 0.0), 1.0)
        return 1.0 - (1.0 - self.options.lambda_end) * progress

    def selection_weights(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        """w_i (B,): the combined confidence of the selected rows, 0 for the others (no gradient)."""
        share = self.teacher_share(state)
        combined = share * torch.softmax(teacher_logits.detach(), dim=1)
        combined = combined + (1 - share) * torch.softmax(student_logits.detach(), dim=1)
        confidence = combined.max(dim=1).values
        return torch.where(confidence >= self.options.threshold, confidence, torch.zeros_like(confidence))

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        teacher = self._teacher(teacher)
        temperature, alpha = self.spec.temperature, self.spec.alpha
        weights = self.selection_weights(student.logits, teacher.logits, state)
        log_student = F.log_softmax(student.logits / temperature, dim=1)
        log_teacher = F.log_softmax(teacher.logits.detach() / temperature, dim=1)
        kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1) * temperature**2
        kd = (weights * kl).sum() / weights.sum().clamp_min(1e-12)
        return alpha * kd + (1 - alpha) * label_ce(student.logits, target)
