"""``kd``: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS DL Workshop 2015."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from edgekd.distill.methods.base import METHODS, DistillMethod, ModelOutputs, soft_kl


@METHODS.register("kd", aliases=("hinton",))
class HintonKD(DistillMethod):
    """Soft targets at temperature T plus the label loss.

    ``L = α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α) · CE(s, y)``; the T² factor keeps the
    soft term's gradients on the scale of the hard term's as T changes.
    """

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        assert teacher is not None
        alpha, temperature = self.spec.alpha, self.spec.temperature
        soft = soft_kl(student.logits, teacher.logits, temperature)
        return alpha * soft + (1 - alpha) * F.cross_entropy(student.logits, target)
