"""``adakd``: Xie, Xue, Wu, Li, Wang, Hu, Liu, Zhang, "LLM-Oriented Token-Adaptive Knowledge
Distillation" (AdaKD), AAAI 2026, arXiv:2510.11615 (official code: github.com/SassyRong/AdaKD)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from edgekd.distill.methods.base import (
    METHODS,
    DistillMethod,
    MethodOptions,
    ModelOutputs,
    ModelShape,
    label_ce,
)
from edgekd.recipe import DistillSpec


def hellinger(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Hellinger distance per row between the two softmax distributions, in [0, 1]."""
    root_s = F.softmax(student_logits, dim=1).sqrt()
    root_t = F.softmax(teacher_logits, dim=1).sqrt()
    return (root_s - root_t).pow(2).sum(dim=1).sqrt() / math.sqrt(2.0)


@METHODS.register("adakd")
class AdaKD(DistillMethod):
    """AdaKD (Xie et al., AAAI 2026, arXiv:2510.11615), per sample: hard-sample focus + inverse-difficulty T.

    Difficulty of sample i: the Hellinger distance ``d_i = ‖√p_s,i − √p_t,i‖₂ / √2`` between the
    student's and teacher's softmax at T_b = ``base_temperature`` (no gradient).

    - LATF: keep the ``max(1, ⌊B·r⌋)`` hardest samples of the batch. r starts at 1; after each
      batch an EMA (decay ``ema_decay``) of the distillation loss is compared with a reference EMA
      (taken once past ``warmup`` of the steps): a drop by more than ``loss_eps`` (relative) gives
      ``r ← max(r·(1 − ratio_step), ratio_min)``, a rise by more than that ``r ← min(r·(1 + ratio_step), 1)``,
      and either resets the reference; otherwise nothing changes.
    - IDTS: on the kept samples, ``T_i = T_b · exp(−c · tanh(log(d_i / median_kept d)))``: harder
      samples get a lower temperature, easier ones a higher one; c = ``temperature_scale``.

    ``L = κ · mean_kept[ T_i² · D(p_t^{T_i}, p_s^{T_i}) ] + (1 − κ) · CE(s, y)``

    with D the reverse KL ``KL(p_s ‖ p_t)`` (``divergence="reverse"``, the paper's default) or the
    forward KL, κ = ``kd_ratio``. The paper scores and selects tokens of a language model; we apply
    the same rules to the samples of a classification batch. Defaults are the official GPT-2 script's:
    c 0.5, ratio_step 0.05, loss_eps 0.05, EMA 0.99, ratio_min 0.1, warmup 0.05, T_b 1 and κ = 1
    (no label term), so ``distill.temperature`` and ``distill.alpha`` are not used. In the official
    code the difficulty is computed on logits already divided by the global temperature (1 there);
    with T_b ≠ 1 we compute it at T_b and scale by T_i once. r, the EMA and the reference are
    buffers (saved in checkpoints); they only change in training mode.
    """

    supports_missing_labels = True

    class Options(MethodOptions):
        divergence: Literal["reverse", "forward"] = Field(
            "reverse", description="per-sample divergence: reverse KL(p_s||p_t) or forward KL(p_t||p_s)"
        )
        base_temperature: float = Field(1.0, gt=0, description="T_b: temperature of the median sample")
        temperature_scale: float = Field(0.5, ge=0, description="c in T_i = T_b*exp(-c*tanh(log(d_i/med)))")
        ratio_min: float = Field(0.1, gt=0, le=1, description="smallest share of the batch kept by LATF")
        ratio_step: float = Field(0.05, ge=0, lt=1, description="relative change of the kept share r")
        loss_eps: float = Field(0.05, ge=0, description="relative EMA-loss change that moves r")
        ema_decay: float = Field(0.99, ge=0, lt=1, description="decay of the EMA of the distillation loss")
        warmup: float = Field(
            0.05, ge=0, le=1, description="share of the steps before LATF takes a reference"
        )
        kd_ratio: float = Field(1.0, ge=0, le=1, description="weight of the AdaKD term; 1 - kd_ratio: CE")
        latf: bool = Field(True, description="adaptive focus on the hardest samples (False: keep all)")
        idts: bool = Field(True, description="per-sample temperatures (False: T_b for every sample)")

    ratio: torch.Tensor
    ema: torch.Tensor
    prev_ema: torch.Tensor

    def __init__(self, spec: DistillSpec, num_classes: int, student: ModelShape, teacher: ModelShape) -> None:
        super().__init__(spec, num_classes, student, teacher)
        self.register_buffer("ratio", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("ema", torch.tensor(float("nan"), dtype=torch.float64))  # nan: no loss seen yet
        self.register_buffer(
            "prev_ema", torch.tensor(float("nan"), dtype=torch.float64)
        )  # nan: no reference yet

    @torch.no_grad()
    def focus(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the kept (hardest) samples and their temperatures T_i."""
        opts = self.options
        base = opts.base_temperature
        difficulty = hellinger(student_logits.detach() / base, teacher_logits.detach() / base)
        n = difficulty.numel()
        keep = max(1, int(n * float(self.ratio))) if opts.latf else n
        kept = torch.topk(difficulty, k=min(keep, n), largest=True).indices
        scores = difficulty[kept]
        if not opts.idts:
            return kept, torch.full_like(scores, base)
        median = torch.median(scores)
        relative = torch.clamp((scores + 1e-12) / (median + 1e-12), min=1e-8)
        return kept, base * torch.exp(-opts.temperature_scale * torch.tanh(torch.log(relative)))

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        teacher = self._teacher(teacher)
        opts = self.options
        s, t = student.logits, teacher.logits.detach()
        kept, temperatures = self.focus(s, t)
        scale = temperatures.to(s.dtype).unsqueeze(1)
        log_s = F.log_softmax(s[kept] / scale, dim=1)
        log_t = F.log_softmax(t[kept] / scale, dim=1)
        if opts.divergence == "reverse":
            per_sample = (log_s.exp() * (log_s - log_t)).sum(dim=1)
        else:
            per_sample = (log_t.exp() * (log_t - log_s)).sum(dim=1)
        distill = (scale.squeeze(1) ** 2 * per_sample).mean()
        if self.training:
            self._update_ratio(float(distill.detach()), int(state.get("step", 0)), int(state.get("steps", 1)))
        if opts.kd_ratio >= 1:
            return distill
        return opts.kd_ratio * distill + (1 - opts.kd_ratio) * label_ce(s, target)

    @torch.no_grad()
    def _update_ratio(self, loss: float, step: int, steps: int) -> None:
        """LATF, as in the official training loop (its 1-based global step is ``step + 1``)."""
        opts = self.options
        if torch.isnan(self.ema):
            self.ema.fill_(loss)
        else:
            self.ema.mul_(opts.ema_decay).add_((1 - opts.ema_decay) * loss)
        ema = float(self.ema)
        if torch.isnan(self.prev_ema):
            if step + 1 > opts.warmup * steps:
                self.prev_ema.fill_(ema)
            return
        reference = float(self.prev_ema)
        change, threshold = reference - ema, reference * opts.loss_eps
        if change < -threshold:
            self.ratio.fill_(min(float(self.ratio) * (1 + opts.ratio_step), 1.0))
            self.prev_ema.fill_(ema)
        elif change > threshold:
            self.ratio.fill_(max(float(self.ratio) * (1 - opts.ratio_step), opts.ratio_min))
            self.prev_ema.fill_(ema)
