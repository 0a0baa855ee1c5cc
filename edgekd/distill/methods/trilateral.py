"""``tgeo``: Hu, Wu, Li, Ma, Chen, Yan, Wang, Liu, "Less or More From Teacher: Exploiting Trilateral
Geometry For Knowledge Distillation", ICLR 2024 (arXiv:2312.15112)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from edgekd.distill.methods.base import METHODS, DistillMethod, MethodOptions, ModelOutputs, ModelShape
from edgekd.recipe import DistillSpec

EDGES = 5  # S-T, S-G, T-G, S-Tbar, T-Tbar


class _Unroll:
    """One meta step's batches and the student's parameters, with functional forward passes."""

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        teacher: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
    ) -> None:
        self.model, self.x, self.y, self.teacher, self.x_val, self.y_val = model, x, y, teacher, x_val, y_val
        self.named = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}

    def logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The student with ``params`` on ``x``; its buffers cloned (running statistics untouched)."""
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        return functional_call(self.model, ({**params, **self.frozen}, buffers), (x,))

    def stepped(
        self, direction: tuple[torch.Tensor | None, ...] | list[torch.Tensor | None], size: float
    ) -> dict[str, torch.Tensor]:
        """``θ + size · direction`` per trainable parameter (unchanged where the direction is None)."""
        return {
            name: p if d is None else p + size * d
            for (name, p), d in zip(self.named.items(), direction, strict=True)
        }


@METHODS.register("tgeo", aliases=("trilateral",))
class TrilateralGeometryKD(DistillMethod):
    """TGeo-KD (Hu et al., ICLR 2024): a sample-wise KD/CE ratio learned from trilateral geometry.

    ``L_train(θ; ω) = (1/B) Σ_i [α_i · T² · KL(softmax(t_i/T) ‖ softmax(s_i/T)) + (1 − α_i) · CE(s_i, y_i)]``,
    ``α_i = sigmoid(f_ω(Δ_i))``

    - f_ω: a small MLP (the "fusion net": ``hidden`` units, ReLU) on the relation features Δ_i,
      which are treated as input (detached): the edges between the vertices S = softmax(s_i/T),
      T = softmax(t_i/T), G = onehot(y_i) (intra-sample) and T̄ = the teacher's mean prediction over
      the training samples of class y_i (inter-sample, computed once in :meth:`prepare`), i.e.
      ``S−T, S−G, T−G, S−T̄, T−T̄`` and their Euclidean norms;
    - θ (the student) is trained on ``L_train`` with α_i held fixed; ω is trained by the bilevel
      outer problem ``min_ω CE(student_θ*(ω), held-out)``, solved by a one-step unroll every
      ``meta_interval`` steps (:meth:`meta_step`): ``θ' = θ − inner_lr · ∇_θ L_train(θ; ω)``, then
      one Adam step (``meta_lr``) on ``∇_ω CE(student_θ'(x_v), y_v)``. ``held_out_fraction`` = 0.1
      of the train split is held back for that outer loss.

    Recipe fields: T = ``distill.temperature``; ``distill.alpha`` sets the initial ratio (the
    fusion net's output bias starts at logit(α)).
    The paper's full text was not available: the structure (MLP on S/T/G/T̄ relations in Euclidean
    space, bilevel training on a validation split) is the paper's, while the exact feature list, the
    vertices at temperature T, the one-step unroll and its interval, learning rates and MLP size are
    our reconstruction.
    """

    held_out_fraction = 0.1
    needs_teacher_dataset = True

    class Options(MethodOptions):
        hidden: int = Field(64, ge=1, le=4096, description="hidden units of the fusion MLP")
        meta_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the fusion MLP (outer problem)")
        inner_lr: float = Field(1e-2, gt=0, description="step size of the virtual (unrolled) student update")
        meta_interval: int = Field(
            5, ge=1, description="update the fusion MLP every this many steps (1: every step, ~4x cost)"
        )

    def __init__(self, spec: DistillSpec, num_classes: int, student: ModelShape, teacher: ModelShape) -> None:
        super().__init__(spec, num_classes, student, teacher)
        hidden = self.options.hidden
        self.fusion = nn.Sequential(
            nn.Linear(EDGES * num_classes + EDGES, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )
        start = min(max(spec.alpha, 0.01), 0.99)
        with torch.no_grad():
            self.fusion[2].weight.mul_(0.1)
            self.fusion[2].bias.fill_(math.log(start / (1 - start)))
        self.register_buffer("class_means", torch.full((num_classes, num_classes), 1.0 / num_classes))
        self.meta_optimizer = torch.optim.Adam(self.fusion.parameters(), lr=self.options.meta_lr)
        self.hypergradient = "exact"  # or "finite differences" (see meta_step)

    def get_extra_state(self) -> dict:
        """The fusion net's Adam moments go into ``state_dict``, so a resumed run continues them."""
        return {"meta_optimizer": self.meta_optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])

    # ---------------------------------------------------------------- hooks

    def student_parameters(self) -> list[nn.Parameter]:
        """None: the fusion net is trained by :meth:`meta_step` only, never on the training loss."""
        return []

    def prepare(self, model: nn.Module, labels: torch.Tensor, teacher: ModelOutputs | None) -> None:
        """T̄_c: mean of softmax(t/T) over the labelled train samples of class c (uniform if none)."""
        teacher = self._teacher(teacher)
        probs = torch.softmax(teacher.logits.detach().float() / self.spec.temperature, dim=1)
        labels = labels.to(probs.device)
        means = torch.full((self.num_classes, self.num_classes), 1.0 / self.num_classes)
        for c in range(self.num_classes):
            members = labels == c
            if bool(members.any()):
                means[c] = probs[members].mean(0).cpu()
        self.class_means.copy_(means.to(self.class_means.device))

    def meta_step(
        self,
        model: nn.Module,
        train_batch: tuple[torch.Tensor, torch.Tensor, ModelOutputs | None],
        held_out_batch: tuple[torch.Tensor, torch.Tensor],
        state: dict[str, Any],
    ) -> None:
        """One Adam step on ω through a virtual student step; the real student is left untouched.

        The hypergradient ``∇_ω CE(student_θ'(x_v), y_v)`` is exact (backpropagation through the
        unrolled step, which needs second derivatives of the student) unless the student holds an op
        PyTorch has no second derivative for (``hardsigmoid`` in MobileNetV3, for one): then, from
        that step on, it is DARTS' finite-difference approximation (Liu, Simonyan, Yang, "DARTS:
        Differentiable Architecture Search", ICLR 2019, eq. 8), which needs first derivatives only:
        ``−inner_lr · (∇_ω L_train(θ⁺; ω) − ∇_ω L_train(θ⁻; ω)) / 2ε`` with ``θ± = θ ± ε·v``,
        ``v = ∇_θ' CE(student_θ'(x_v), y_v)`` and ``ε = 0.01 / ‖v‖``. :attr:`hypergradient` says which.
        Parameters and buffers are passed to :func:`torch.func.functional_call` explicitly, the
        buffers as clones, so the virtual forward passes never change the model's BatchNorm
        running statistics.
        """
        if int(state.get("step", 0)) % self.options.meta_interval:
            return
        x, y, teacher = train_batch
        device = next(self.fusion.parameters()).device
        x_val, y_val = held_out_batch
        batch = _Unroll(
            model,
            x.to(device),
            y.to(device),
            self._teacher(teacher).logits.to(device),
            x_val.to(device),
            y_val.to(device),
        )
        grads = None
        if self.hypergradient == "exact":
            try:
                grads = self._exact_hypergradient(batch)
            except RuntimeError as exc:
                if "derivative for" not in str(exc) or "not implemented" not in str(exc):
                    raise
                self.hypergradient = "finite differences"
        if grads is None:
            grads = self._difference_hypergradient(batch)
        self.meta_optimizer.zero_grad(set_to_none=True)
        for param, grad in zip(self.fusion.parameters(), grads, strict=True):
            param.grad = None if grad is None else grad.detach()
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)

    def _exact_hypergradient(self, batch: _Unroll) -> list[torch.Tensor | None]:
        with torch.enable_grad():
            train_loss = self._weighted_loss(
                batch.logits(batch.named, batch.x), batch.teacher, batch.y, False
            )
            grads = torch.autograd.grad(
                train_loss, list(batch.named.values()), create_graph=True, allow_unused=True
            )
            virtual = batch.stepped(grads, -self.options.inner_lr)
            val_loss = F.cross_entropy(batch.logits(virtual, batch.x_val), batch.y_val)
            return list(torch.autograd.grad(val_loss, list(self.fusion.parameters()), allow_unused=True))

    def _difference_hypergradient(self, batch: _Unroll) -> list[torch.Tensor | None]:
        fusion = list(self.fusion.parameters())
        with torch.enable_grad():
            logits = batch.logits(batch.named, batch.x)
            train_loss = self._weighted_loss(logits, batch.teacher, batch.y, False)
            grads = torch.autograd.grad(train_loss, list(batch.named.values()), allow_unused=True)
            virtual = {
                name: p.detach().requires_grad_(True)
                for name, p in batch.stepped(grads, -self.options.inner_lr).items()
            }
            val_loss = F.cross_entropy(batch.logits(virtual, batch.x_val), batch.y_val)
            direction = torch.autograd.grad(val_loss, list(virtual.values()), allow_unused=True)
        norm = torch.sqrt(sum((g.pow(2).sum() for g in direction if g is not None), torch.tensor(0.0)))
        if float(norm) == 0.0:
            return [torch.zeros_like(p) for p in fusion]
        epsilon = 0.01 / float(norm)
        features = self.relation_features(logits, batch.teacher, batch.y)  # Δ held at θ, an input

        def fusion_grads(sign: float) -> tuple[torch.Tensor | None, ...]:
            with torch.no_grad():
                shifted = batch.logits(batch.stepped(direction, sign * epsilon), batch.x)
            with torch.enable_grad():
                loss = self._weighted_loss(shifted, batch.teacher, batch.y, False, features)
                return torch.autograd.grad(loss, fusion, allow_unused=True)

        plus, minus = fusion_grads(1.0), fusion_grads(-1.0)
        scale = -self.options.inner_lr / (2 * epsilon)
        return [None if a is None else scale * (a - b) for a, b in zip(plus, minus, strict=True)]

    # ---------------------------------------------------------------- loss

    def relation_features(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """Δ_i (B, 5C + 5): edges S−T, S−G, T−G, S−T̄, T−T̄ and their Euclidean norms (detached)."""
        temperature = self.spec.temperature
        s = torch.softmax(student_logits.detach() / temperature, dim=1)
        t = torch.softmax(teacher_logits.detach() / temperature, dim=1)
        g = F.one_hot(target, self.num_classes).to(s.dtype)
        t_bar = self.class_means.to(s)[target]
        edges = [s - t, s - g, t - g, s - t_bar, t - t_bar]
        norms = [edge.norm(dim=1, keepdim=True) for edge in edges]
        return torch.cat([*edges, *norms], dim=1)

    def ratios(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """α_i in (0, 1), shape (B,), differentiable with respect to the fusion net only; from
        ``features`` when given (Δ held at another student's logits), else from these logits."""
        if features is None:
            features = self.relation_features(student_logits, teacher_logits, target)
        return torch.sigmoid(self.fusion(features).squeeze(1))

    def _weighted_loss(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        detach_ratio: bool,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        temperature = self.spec.temperature
        alpha = self.ratios(student_logits, teacher_logits, target, features)
        if detach_ratio:
            alpha = alpha.detach()
        log_student = F.log_softmax(student_logits / temperature, dim=1)
        log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
        kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1) * temperature**2
        ce = F.cross_entropy(student_logits, target, reduction="none")
        return (alpha * kl + (1 - alpha) * ce).mean()

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        teacher = self._teacher(teacher)
        return self._weighted_loss(student.logits, teacher.logits, target, detach_ratio=True)
