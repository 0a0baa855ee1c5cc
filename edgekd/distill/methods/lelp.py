"""``lelp``: Loo, Iliopoulos, Hu, Vee, "Linear Projections of Teacher Embeddings for Few-Class
Distillation", 2024 (arXiv:2409.20449)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgekd.distill.methods.base import (
    METHODS,
    DistillMethod,
    MethodOptions,
    ModelOutputs,
    ModelShape,
    label_ce,
)
from edgekd.errors import RecipeError
from edgekd.models.heads import SubclassHead
from edgekd.recipe import DistillSpec


@METHODS.register("lelp")
class LinearEmbeddingProjections(DistillMethod):
    """LELP (Loo et al., 2024): pseudo-subclass targets from linear projections of teacher embeddings.

    ``L = − Σ_{c,s} q_{c,s}(x) · log softmax(z)_{c,s} + λ · CE(logsumexp_s z_{c,s}, y)``,
    ``q_{c,s}(x) = softmax(t/τ)_c · softmax_s(u_{c,s}(x)/β)``,
    ``u_c(x) = R_c V_cᵀ (P h_T(x) − m_c) / σ_c``

    - z (B, C·S): the student's subclass scores from a :class:`~edgekd.models.heads.SubclassHead`
      installed in :meth:`prepare` (S pseudo-subclasses per class; at inference the class score is
      ``logsumexp_s z_{c,s}``, i.e. class probabilities are summed subclass probabilities);
    - h_T: the teacher's embedding; P: projection onto the null space of the teacher's
      embedding-to-logits map (fitted by least squares on the train split, since only the teacher's
      outputs are available; ``null_space: false`` uses P = I); V_c: the top-S principal
      directions of the projected embeddings of class c (centred at their mean m_c); R_c: a random
      S × S rotation (seeded by ``seed``) that evens out the variance across the S directions;
      σ_c: the root-mean-square of u_c over class c's train embeddings;
    - τ = ``class_temperature``, β = ``subclass_temperature``, λ = ``label_weight`` (0: the paper's
      experiments use the unified subclass cross-entropy alone).

    Class membership for the PCA is the train label, or the teacher's prediction for unlabelled rows.
    ``distill.temperature`` and ``distill.alpha`` are not used.
    The paper's full text was not available: the per-class PCA of null-space-projected teacher
    embeddings, the random rotation, the tempered subclass softmax and the single C·S cross-entropy
    are the paper's; centring at m_c, the σ_c standardisation, the least-squares null space and the
    default S are our reconstruction.
    """

    needs_features = True
    needs_teacher_dataset = True
    supports_missing_labels = True

    class Options(MethodOptions):
        subclasses: int = Field(4, ge=1, le=64, description="pseudo-subclasses per class (S)")
        subclass_temperature: float = Field(
            1.0, gt=0, description="temperature β of the softmax over a class's subclass coordinates"
        )
        class_temperature: float = Field(
            1.0, gt=0, description="temperature τ of the teacher's class softmax"
        )
        null_space: bool = Field(True, description="project embeddings onto the null space of the logit map")
        label_weight: float = Field(0.0, ge=0, description="weight λ of an extra class-level label loss")
        seed: int = Field(0, description="seeds the random rotations")

    def __init__(self, spec: DistillSpec, num_classes: int, student: ModelShape, teacher: ModelShape) -> None:
        super().__init__(spec, num_classes, student, teacher)
        dim, subclasses = self.teacher_dim, self.options.subclasses
        if subclasses > dim:
            raise RecipeError(
                f"distill.options.lelp.subclasses: {subclasses} exceeds the teacher's embedding width {dim}"
            )
        self.register_buffer("null_projection", torch.eye(dim))
        self.register_buffer("centres", torch.zeros(num_classes, dim))
        self.register_buffer("directions", torch.zeros(num_classes, dim, subclasses))
        self.register_buffer("scales", torch.ones(num_classes))

    def prepare(self, model: nn.Module, labels: torch.Tensor, teacher: ModelOutputs | None) -> None:
        """Fit P, m_c, V_c R_cᵀ and σ_c on the teacher's train embeddings; install the subclass head."""
        teacher = self._teacher(teacher)
        if teacher.features is None:
            raise ValueError("lelp needs the teacher's embeddings of the train split, got None")
        self._fit_directions(teacher.features.detach(), teacher.logits.detach(), labels)
        self._install_head(model)

    @torch.no_grad()
    def _fit_directions(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        h = features.cpu().double()
        logits = logits.cpu().double()
        dim, subclasses = h.shape[1], self.options.subclasses
        projection = torch.eye(dim, dtype=torch.float64)
        if self.options.null_space:
            design = torch.cat([h, torch.ones(len(h), 1, dtype=torch.float64)], dim=1)
            solution = torch.linalg.lstsq(design, logits, driver="gelsd").solution  # (D + 1, C)
            _, singular, vh = torch.linalg.svd(solution[:dim].T, full_matrices=False)  # W: (C, D)
            rank = int((singular > singular.max().clamp_min(1e-300) * 1e-6).sum())
            row_space = vh[:rank].T
            projection = projection - row_space @ row_space.T
        labels = labels.cpu().long()
        members_of = torch.where(labels >= 0, labels, logits.argmax(1))
        projected = h @ projection
        generator = torch.Generator().manual_seed(self.options.seed)
        centres = torch.zeros(self.num_classes, dim, dtype=torch.float64)
        directions = torch.zeros(self.num_classes, dim, subclasses, dtype=torch.float64)
        scales = torch.ones(self.num_classes, dtype=torch.float64)
        for c in range(self.num_classes):
            members = projected[members_of == c]
            if len(members):
                centres[c] = members.mean(0)
            centred = members - centres[c]
            _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
            top = vectors[:, -subclasses:].flip(1)  # (D, S), largest variance first
            gaussian = torch.randn(subclasses, subclasses, generator=generator, dtype=torch.float64)
            q, r = torch.linalg.qr(gaussian)
            rotation = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)  # Haar-distributed orthogonal
            directions[c] = top @ rotation.T
            if len(members):
                rms = (centred @ directions[c]).pow(2).mean().sqrt()
                scales[c] = rms if rms > 1e-12 else 1.0
        for name, value in (
            ("null_projection", projection),
            ("centres", centres),
            ("directions", directions),
            ("scales", scales),
        ):
            buffer = getattr(self, name)
            buffer.copy_(value.to(buffer.device, buffer.dtype))

    def _install_head(self, model: nn.Module) -> None:
        old, subclasses = model.head, self.options.subclasses
        if isinstance(old, SubclassHead) and old.subclasses == subclasses:
            head = old
        else:
            head = SubclassHead(model.feature_dim, self.num_classes, subclasses).to(
                old.weight.device, old.weight.dtype
            )
            with torch.no_grad():  # each subclass starts as its class: logsumexp_s = the old logit
                head.linear.weight.copy_(old.weight.repeat_interleave(subclasses, dim=0))
                head.linear.bias.copy_(old.bias.repeat_interleave(subclasses) - math.log(subclasses))
            model.head = head
        self.__dict__["_head"] = head  # a reference, not a submodule: the head belongs to the student

    def subclass_targets(self, teacher_logits: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        """q (B, C·S), class-major like the head: column c·S + s is subclass s of class c."""
        h = teacher_features.detach().to(self.directions.dtype)
        coordinates = torch.einsum("bd,cds->bcs", h @ self.null_projection, self.directions)
        coordinates = coordinates - torch.einsum("cd,cds->cs", self.centres, self.directions)
        coordinates = coordinates / self.scales[:, None]
        within = torch.softmax(coordinates / self.options.subclass_temperature, dim=2)
        classes = torch.softmax(teacher_logits.detach().float() / self.options.class_temperature, dim=1)
        return (classes.to(within)[:, :, None] * within).reshape(len(h), -1)

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        teacher = self._teacher(teacher)
        head = self.__dict__.get("_head")
        if head is None:
            raise ValueError(
                "lelp: prepare(model, ...) must install the subclass head before loss() is called"
            )
        if student.features is None or teacher.features is None:
            raise ValueError("lelp needs the student's and the teacher's embeddings, got None")
        targets = self.subclass_targets(teacher.logits, teacher.features)
        log_probs = F.log_softmax(head.subclass_logits(student.features), dim=1)
        total = -(targets.to(log_probs) * log_probs).sum(dim=1).mean()
        if self.options.label_weight > 0:
            total = total + self.options.label_weight * label_ce(student.logits, target)
        return total
