"""Classifier heads other than one ``nn.Linear``, installed by distillation methods that deploy them.

A model's ``head`` maps its embedding (B, D) to class scores (B, C). Some methods train a head of
another form and deploy it: the head then records itself in the checkpoint (``spec()``), and
:func:`edgekd.models.checkpoint.load_weights` rebuilds it before loading the weights. Every head
here uses standard operators only (Linear, Softmax, Log, ReduceLogSumExp), so it exports to ONNX.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgekd.errors import ModelError
from edgekd.registry import Registry


class DualHead(nn.Module):
    """Two linear heads on one embedding, combined in probability space (DHO, Kang et al., 2025).

    ``ce`` is trained on the labels, ``kd`` on the teacher's soft targets; inference returns
    ``log((1 − α) · softmax(ce(f)) + α · softmax(kd(f) / β))``, log-probabilities whose argmax and
    softmax are those of the paper's mixed prediction.
    """

    kind = "dual"

    def __init__(self, in_features: int, out_features: int, alpha: float = 0.5, beta: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.alpha, self.beta = float(alpha), float(beta)
        self.ce = nn.Linear(in_features, out_features)
        self.kd = nn.Linear(in_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        mixed = (1 - self.alpha) * torch.softmax(self.ce(features), dim=1)
        mixed = mixed + self.alpha * torch.softmax(self.kd(features) / self.beta, dim=1)
        return torch.log(mixed.clamp_min(1e-12))

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "alpha": self.alpha, "beta": self.beta, "subclasses": 1}


class SubclassHead(nn.Module):
    """A linear head over C × S pseudo-subclasses whose class score is ``logsumexp`` over a class's S.

    ``softmax`` of the class scores equals the subclass probabilities summed per class, the
    inference rule of subclass distillation (Müller et al., 2020; LELP, Loo et al., 2024).
    """

    kind = "subclass"

    def __init__(self, in_features: int, out_features: int, subclasses: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.subclasses = in_features, out_features, subclasses
        self.linear = nn.Linear(in_features, out_features * subclasses)

    def subclass_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C · S) scores, class-major: subclass s of class c is column ``c · S + s``."""
        return self.linear(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        scores = self.subclass_logits(features)
        return torch.logsumexp(scores.reshape(len(scores), self.out_features, self.subclasses), dim=2)

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "subclasses": self.subclasses}


HeadFactory = Callable[[int, int, dict[str, Any]], nn.Module]
HEADS: Registry[HeadFactory] = Registry("classifier head", error=ModelError)
HEADS.register("dual")(lambda dim, classes, spec: DualHead(dim, classes, spec["alpha"], spec["beta"]))
HEADS.register("subclass")(lambda dim, classes, spec: SubclassHead(dim, classes, spec["subclasses"]))


def build_head(spec: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
    """The head a checkpoint's ``head`` entry describes, freshly initialised."""
    return HEADS.get(str(spec.get("type")))(in_features, out_features, spec)
