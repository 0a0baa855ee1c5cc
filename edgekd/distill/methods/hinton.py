"""``kd``: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS DL Workshop 2015."""

from __future__ import annotations

from typing import Any

import torch

from edgekd.distill.methods.base import METHODS, DistillMethod, ModelOutputs, label_ce, soft_kl


@METHODS.register("kd", aliases=("hinton",))
class HintonKD(DistillMethod):
    """Soft targets at temperature T plus the label loss (Hinton et al., 2015, section 2).

    ``L = α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α) · CE(s, y)``

    with s, t the student and teacher logits, T = ``distill.temperature``, α = ``distill.alpha``.
    Unlabelled samples (semi-supervised runs) contribute the soft term only.
    """

    supports_missing_labels = True

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        teacher = self._teacher(teacher)
        alpha = self.spec.alpha
        soft = soft_kl(student.logits, teacher.logits, self.spec.temperature)
        return alpha * soft + (1 - alpha) * label_ce(student.logits, target)
