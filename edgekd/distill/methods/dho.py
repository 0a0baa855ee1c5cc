"""``dho``: Kang, Lee, Jang, Hwang, "Simple yet Effective Semi-supervised Knowledge Distillation from
Vision-Language Models via Dual-Head Optimization", 2025 (arXiv:2505.07675)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from edgekd.distill.methods.base import METHODS, DistillMethod, MethodOptions, ModelOutputs, label_ce, soft_kl
from edgekd.models.heads import DualHead


@METHODS.register("dho")
class DualHeadKD(DistillMethod):
    """Dual-Head Optimization (Kang et al., 2025): separate label and distillation heads on one embedding.

    ``L = w_ce · CE(h_CE(f), y) + w_kd · T² · KL(softmax(t/T) ‖ softmax(h_KD(f)/T))``

    - f: the student's embedding; h_CE, h_KD: two linear heads (a
      :class:`~edgekd.models.heads.DualHead` installed in :meth:`prepare`, both initialised from the
      student's original head); the CE term uses the labelled rows only (batch mean over them),
      the KD term every row, labelled or not, so the label and teacher gradients never conflict in
      one head;
    - inference (the deployed head): ``p = (1 − a) · softmax(h_CE(f)) + a · softmax(h_KD(f) / b)``.

    Options: ``ce_weight`` = w_ce, ``kd_weight`` = w_kd (0.5 each), ``temperature`` = T (2.0), and
    the inference ``inference_alpha`` = a, ``inference_beta`` = b. Defaults are those of the
    official code (erjui/DHO), which sums one KD batch mean over a labelled and one over an
    unlabelled batch; our trainer draws mixed batches, so the KD term is one mean over all rows.
    The paper picks a and b by grid search on a validation split every epoch; we use fixed values
    (0.5, 1.0), since the held-out split here is the evaluation set.
    ``distill.temperature`` and ``distill.alpha`` are not used.
    """

    needs_features = True
    supports_missing_labels = True

    class Options(MethodOptions):
        ce_weight: float = Field(0.5, ge=0, description="weight of the label loss on the CE head")
        kd_weight: float = Field(0.5, ge=0, description="weight of the distillation loss on the KD head")
        temperature: float = Field(2.0, gt=0, description="softmax temperature of the KD-head loss")
        inference_alpha: float = Field(
            0.5, ge=0, le=1, description="inference weight of the KD head's probabilities (0: CE head only)"
        )
        inference_beta: float = Field(1.0, gt=0, description="inference temperature of the KD head")

    def prepare(self, model: nn.Module, labels: torch.Tensor, teacher: ModelOutputs | None) -> None:
        """Replace ``model.head`` by a DualHead whose two heads both start as copies of the old one."""
        old = model.head
        if isinstance(old, DualHead):
            head = old
            head.alpha, head.beta = self.options.inference_alpha, self.options.inference_beta
        else:
            head = DualHead(
                model.feature_dim,
                self.num_classes,
                alpha=self.options.inference_alpha,
                beta=self.options.inference_beta,
            ).to(old.weight.device, old.weight.dtype)
            with torch.no_grad():
                for linear in (head.ce, head.kd):
                    linear.weight.copy_(old.weight)
                    linear.bias.copy_(old.bias)
            model.head = head
        self.__dict__["_head"] = head  # a reference, not a submodule: the head belongs to the student

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        teacher = self._teacher(teacher)
        head = self.__dict__.get("_head")
        if head is None:
            raise ValueError("dho: prepare(model, ...) must install the dual head before loss() is called")
        if student.features is None:
            raise ValueError("dho needs the student's features, got None")
        options = self.options
        ce = label_ce(head.ce(student.features), target)
        kd = soft_kl(head.kd(student.features), teacher.logits, options.temperature)
        return options.ce_weight * ce + options.kd_weight * kd
