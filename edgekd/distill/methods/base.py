"""The interface of a distillation method, its registry, and the soft-target term several methods share.

A method is an ``nn.Module``: its trainable parts (connectors, projectors) are submodules and are
optimised together with the student; :meth:`DistillMethod.loss` turns the student's and teacher's
outputs for a batch into one scalar. Methods register by name in :data:`METHODS` when
:mod:`edgekd.distill.methods` is imported; each method's docstring cites its paper and states its loss.
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
    """Base of every method; subclasses implement :meth:`loss`.

    ``needs_teacher``: the trainer passes teacher outputs (else ``teacher`` is ``None``).
    ``needs_features``: the trainer fills ``features`` of both outputs (else they may be ``None``).
    Teacher tensors are constants to a method: losses detach them, so no gradient ever reaches the
    teacher, whether its outputs come from a cache or from a live forward pass.
    """

    needs_teacher: bool = True
    needs_features: bool = False

    def __init__(self, spec: DistillSpec, num_classes: int, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.num_classes = num_classes
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        """Scalar loss for one batch; ``state`` holds ``epoch`` (0-based) and ``epochs``."""
        raise NotImplementedError

    def _teacher(self, teacher: ModelOutputs | None) -> ModelOutputs:
        if teacher is None:
            raise ValueError(f"distillation method {type(self).__name__} needs teacher outputs, got None")
        return teacher


METHODS: Registry[type[DistillMethod]] = Registry("distillation method")


def build_method(spec: DistillSpec, num_classes: int, student_dim: int, teacher_dim: int) -> DistillMethod:
    """The method named ``spec.method``; an unknown name raises ``RecipeError`` with a close match."""
    return METHODS.get(spec.method)(spec, num_classes, student_dim, teacher_dim)


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-target term of Hinton et al. (2015): ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch mean.

    Computed from log-softmax of both sides (``log_target``), so it stays finite for extreme logits;
    the teacher logits are detached. The T² factor keeps its gradients on the scale of a
    cross-entropy term as T changes.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2
