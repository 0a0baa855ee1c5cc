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

        Parameters and buffers are passed to :func:`torch.func.functional_call` explicitly, the
        buffers as clones, so the virtual forward passes never change the model's BatchNorm
        running statistics.
        """
        if int(state.get("step", 0)) % self.options.meta_interval:
            return
        x, y, teacher = train_batch
        teacher = self._teacher(teacher)
        x_val, y_val = held_out_batch
        device = next(self.fusion.parameters()).device
        x, y, x_val, y_val = x.to(device), y.to(device), x_val.to(device), y_val.to(device)
        named = {name: p for name, p in model.named_parameters() if p.requires_grad}
        frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}

        def buffers() -> dict[str, torch.Tensor]:
            return {name: b.clone() for name, b in model.named_buffers()}

        with torch.enable_grad():
            logits = functional_call(model, ({**named, **frozen}, buffers()), (x,))
            train_loss = self._weighted_loss(logits, teacher.logits.to(device), y, detach_ratio=False)
            grads = torch.autograd.grad(
                train_loss, list(named.values()), create_graph=True, allow_unused=True
            )
            virtual = {
                name: p if g is None else p - self.options.inner_lr * g
                for (name, p), g in zip(named.items(), grads, strict=True)
            }
            val_logits = functional_call(model, ({**virtual, **frozen}, buffers()), (x_val,))
            val_loss = F.cross_entropy(val_logits, y_val)
            fusion_params = list(self.fusion.parameters())
            meta_grads = torch.autograd.grad(val_loss, fusion_params, allow_unused=True)
        self.meta_optimizer.zero_grad(set_to_none=True)
        for param, grad in zip(fusion_params, meta_grads, strict=True):
            param.grad = None if grad is None else grad.detach()
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)

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
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """α_i in (0, 1), shape (B,), differentiable with respect to the fusion net only."""
        features = self.relation_features(student_logits, teacher_logits, target)
        return torch.sigmoid(self.fusion(features).squeeze(1))

    def _weighted_loss(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        detach_ratio: bool,
    ) -> torch.Tensor:
        temperature = self.spec.temperature
        alpha = self.ratios(student_logits, teacher_logits, target)
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
