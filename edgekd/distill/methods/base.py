"""The interface of a distillation method and its registry.

A method is an ``nn.Module``: its trainable parts (connectors, projectors) are submodules and are
optimised together with the student; ``loss`` turns student and teacher outputs into a scalar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.recipe import DistillSpec
from edgekd.registry import Registry


@dataclass
class ModelOutputs:
    """What a model produced for a batch: logits (B, C) and, when asked, penultimate features (B, D)."""

    logits: torch.Tensor
    features: torch.Tensor | None = None


class DistillMethod(nn.Module):
    """Base of every method; subclasses implement :meth:`loss` and cite their paper."""

    needs_teacher: bool = True
    needs_features: bool = False

    def __init__(self, spec: DistillSpec, num_classes: int, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.num_classes = num_classes

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        raise NotImplementedError


METHODS: Registry[type[DistillMethod]] = Registry("distillation method")


def build_method(spec: DistillSpec, num_classes: int, student_dim: int, teacher_dim: int) -> DistillMethod:
    return METHODS.get(spec.method)(spec, num_classes, student_dim, teacher_dim)


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch mean (Hinton et al., 2015)."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2
