"""``taid``: Shing, Misaki, Bao, Yokoi, Akiba, "TAID: Temporally Adaptive Interpolated Distillation
for Efficient Knowledge Transfer in Language Models", ICLR 2025, arXiv:2501.16937
(official code: github.com/SakanaAI/TAID, ``src/distil_losses/taid.py``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from edgekd.distill.methods.base import METHODS, DistillMethod, MethodOptions, ModelOutputs, ModelShape
from edgekd.recipe import DistillSpec


@METHODS.register("taid")
class TAID(DistillMethod):
    """TAID (Shing et al., ICLR 2025, arXiv:2501.16937): distil towards a student→teacher interpolation.

    ``p_t = softmax((1 − t) · sg(s) + t · z_T)``, ``L = KL(p_t ‖ softmax(s))``, batch mean

    (sg: stop-gradient; logit-space interpolation at temperature 1; no label term). After each
    batch, with the detached loss value L_n, the interpolation weight t moves as in the official code:
    ``m ← β·m + (1 − β)·(L_{n−1} − L_n)/L_{n−1}``, ``t ← min(t_end, max(t_lin, t + a·σ(m)·(1 − t)))``
    with the linear floor ``t_lin = t_start + (t_end − t_start)·(step + 1)/steps`` (t stays at
    t_start on the first batch, which only records L). So t never decreases and is t_end after the
    last step (the official floor uses ``step/steps``: ours runs one step ahead so the schedule ends
    exactly at t_end). As in the official code the value driving the update is the cross-entropy
    ``−Σ p_t log softmax(s)``; the loss returned is the KL, which has the same gradient.
    t, m and the previous loss are buffers, so checkpoints resume the schedule; t only moves in
    training mode. Options (official defaults): ``t_start`` 0.4, ``t_end`` 1.0, ``alpha`` (a) 5e-4,
    ``beta`` 0.99, ``adaptive`` (False: the linear-schedule ablation). ``distill.temperature`` and
    ``distill.alpha`` are not used. Works without labels.
    """

    supports_missing_labels = True

    class Options(MethodOptions):
        t_start: float = Field(0.4, ge=0, lt=1, description="initial interpolation weight of the teacher")
        t_end: float = Field(1.0, gt=0, le=1, description="final interpolation weight of the teacher")
        alpha: float = Field(5e-4, ge=0, le=1, description="step size of the adaptive update of t")
        beta: float = Field(0.99, ge=0, lt=1, description="momentum of the relative loss improvement")
        adaptive: bool = Field(True, description="adaptive update; False: t follows the linear schedule")

        @model_validator(mode="after")
        def _ordered(self) -> TAID.Options:
            if self.t_end < self.t_start:
                raise ValueError(f"t_end ({self.t_end}) must be >= t_start ({self.t_start})")
            return self

    t: torch.Tensor
    momentum: torch.Tensor
    prev_loss: torch.Tensor

    def __init__(self, spec: DistillSpec, num_classes: int, student: ModelShape, teacher: ModelShape) -> None:
        super().__init__(spec, num_classes, student, teacher)
        self.register_buffer("t", torch.tensor(float(self.options.t_start)))
        self.register_buffer("momentum", torch.zeros(()))
        self.register_buffer("prev_loss", torch.tensor(float("inf")))  # inf: no loss seen yet

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        teacher = self._teacher(teacher)
        s = student.logits
        t = self.t.to(s.dtype)
        log_target = F.log_softmax((1 - t) * s.detach() + t * teacher.logits.detach(), dim=1)
        log_student = F.log_softmax(s, dim=1)
        target_probs = log_target.exp()
        kl = (target_probs * (log_target - log_student)).sum(dim=1).mean()
        if self.training:
            with torch.no_grad():
                cross_entropy = -(target_probs * log_student).sum(dim=1).mean()
                self._update_t(cross_entropy.float(), int(state.get("step", 0)), int(state.get("steps", 1)))
        return kl

    @torch.no_grad()
    def _update_t(self, loss: torch.Tensor, step: int, steps: int) -> None:
        opts = self.options
        if torch.isinf(self.prev_loss):
            self.prev_loss.copy_(loss)
            return
        relative = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum.mul_(opts.beta).add_((1 - opts.beta) * relative)
        progress = min(1.0, (step + 1) / max(steps, 1))
        t_lin = opts.t_start + (opts.t_end - opts.t_start) * progress
        if opts.adaptive:
            stepped = self.t + opts.alpha * torch.sigmoid(self.momentum) * (1 - self.t)
            self.t.copy_(torch.clamp(torch.clamp(stepped, min=t_lin), max=opts.t_end))
        else:
            self.t.fill_(t_lin)
        self.prev_loss.copy_(loss)
