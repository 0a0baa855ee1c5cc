"""``none``: the student trained on the labels alone — the baseline every method is compared with."""

from __future__ import annotations

from typing import Any

import torch

from edgekd.distill.methods.base import METHODS, DistillMethod, ModelOutputs, label_ce


@METHODS.register("none", aliases=("ce", "supervised"))
class Supervised(DistillMethod):
    """Cross-entropy on the ground-truth labels, ``L = CE(s, y)``; no teacher is used or needed."""

    needs_teacher = False
    supports_missing_labels = True

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        return label_ce(student.logits, target)
