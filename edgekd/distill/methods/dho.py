"""``dho``: Kang, Lee, Jang, Hwang, "Simple yet Effective Semi-supervised Knowledge Distillation from
Vision-Language Models via Dual-Head Optimization", 2025 (arXiv:2505.07675); official code:
github.com/erjui/DHO (``train_others.py``: the loss and the validation grid search of the mix)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgekd.distill.methods.base import METHODS, DistillMethod, MethodOptions, ModelOutputs, label_ce, soft_kl
from edgekd.models.heads import DualHead

# The official search grid: the CE head's weight 0, 0.05, ..., 1 and the KD head's temperature.
CE_WEIGHT_GRID = tuple(i / 20 for i in range(21))
BETA_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)
HELD_OUT_FRACTION = 0.1


def search_mix(
    ce_logits: torch.Tensor, kd_logits: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float, float]:
    """The official grid search of the inference mix: ``(a, b, accuracy)`` maximising held-out accuracy.

    Prediction ``argmax(w · softmax(ce) + (1 − w) · softmax(kd / b))`` for w on :data:`CE_WEIGHT_GRID`
    and b on :data:`BETA_GRID`, visited b-major as in the official loop, a strictly better accuracy
    replacing the best (so ties keep the first; nothing better than 0 keeps w = 0, b = 1). Returned
    ``a = 1 − w`` is the KD head's weight, as :class:`~edgekd.models.heads.DualHead` takes it.
    """
    probs_ce = F.softmax(ce_logits.float(), dim=1)
    best = (0.0, 1.0, 0.0)  # (w, b, accuracy): the official starting point
    for beta in BETA_GRID:
        probs_kd = F.softmax(kd_logits.float() / beta, dim=1)
        for weight in CE_WEIGHT_GRID:
            predicted = (weight * probs_ce + (1 - weight) * probs_kd).argmax(dim=1)
            accuracy = float((predicted == labels).float().mean())
            if accuracy > best[2]:
                best = (weight, beta, accuracy)
    return 1.0 - best[0], best[1], best[2]


@METHODS.register("dho")
class DualHeadKD(DistillMethod):
    """Dual-Head Optimization (Kang et al., 2025): separate label and distillation heads on one embedding.

    ``L = w_ce · CE(h_CE(f), y) + w_kd · (KD_labelled + KD_unlabelled)``,
    ``KD_g = T² · KL(softmax(t/T) ‖ softmax(h_KD(f)/T))`` batch mean over the rows of group g

    - f: the student's embedding; h_CE, h_KD: two linear heads (a
      :class:`~edgekd.models.heads.DualHead` installed in :meth:`prepare`, both initialised from the
      student's original head); the CE term uses the labelled rows only (batch mean over them), the
      KD terms every row, so the label and teacher gradients never conflict in one head;
    - as in the official code (``loss = 0.5 * ce_loss + 0.5 * (distill_loss_labeled +
      distill_loss_unlabeled)``) the KD loss is the *sum* of two batch means, one over a labelled
      and one over an unlabelled batch. Our trainer draws mixed batches, so the groups are the
      batch's labelled and unlabelled rows; when a batch holds only one group (e.g. every label
      kept), that group's mean stands for both, i.e. the KD term is 2 × its mean;
    - inference (the deployed head): ``p = (1 − a) · softmax(h_CE(f)) + a · softmax(h_KD(f) / b)``.
      As in the official code, a and b are grid-searched after every epoch on a validation split
      (:func:`search_mix`): here the method's held-out slice of the train split
      (``held_out_fraction`` = 0.1, stratified, never trained on), evaluated with the end-of-epoch
      student. The last search's a, b and held-out accuracy are recorded (method state, the
      deployed head's checkpoint entry, and :meth:`record`). With ``search_mix`` false, or without
      labelled held-out rows, the fixed ``inference_alpha`` = a and ``inference_beta`` = b apply.

    Options: ``ce_weight`` = w_ce, ``kd_weight`` = w_kd (0.5 each), ``temperature`` = T (2.0): the
    official values. ``distill.temperature`` and ``distill.alpha`` are not used.
    """

    needs_features = True
    supports_missing_labels = True
    held_out_fraction = HELD_OUT_FRACTION

    class Options(MethodOptions):
        ce_weight: float = Field(0.5, ge=0, description="weight of the label loss on the CE head")
        kd_weight: float = Field(
            0.5, ge=0, description="weight of the summed labelled + unlabelled distillation losses"
        )
        temperature: float = Field(2.0, gt=0, description="softmax temperature of the KD-head loss")
        search_mix: bool = Field(
            True, description="grid-search the inference mix on a held-out 10% of the train split"
        )
        inference_alpha: float = Field(
            0.5, ge=0, le=1, description="fixed mix (no search): weight of the KD head's probabilities"
        )
        inference_beta: float = Field(1.0, gt=0, description="fixed mix (no search): KD head temperature")

    mix_alpha: torch.Tensor
    mix_beta: torch.Tensor
    mix_accuracy: torch.Tensor

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.options.search_mix:
            self.held_out_fraction = 0.0
        nan = float("nan")  # NaN: no search has run yet
        self.register_buffer("mix_alpha", torch.tensor(nan))
        self.register_buffer("mix_beta", torch.tensor(nan))
        self.register_buffer("mix_accuracy", torch.tensor(nan))
        self._held_count = 0
        self._held: list[tuple[torch.Tensor, torch.Tensor]] = []

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
        if self.held_out_fraction > 0:
            from edgekd.distill.trainer import split_held_out  # the trainer's split; its size needs no seed

            self._held_count = len(split_held_out(labels.numpy(), self.held_out_fraction, 0)[1])

    def _dual_head(self) -> DualHead:
        head = self.__dict__.get("_head")
        if head is None:
            raise ValueError("dho: prepare(model, ...) must install the dual head before loss() is called")
        return head

    def loss(
        self, student: ModelOutputs, teacher: ModelOutputs | None, target: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        teacher = self._teacher(teacher)
        head = self._dual_head()
        if student.features is None:
            raise ValueError("dho needs the student's features, got None")
        options = self.options
        ce = label_ce(head.ce(student.features), target)
        kd_logits = head.kd(student.features)
        labelled = target >= 0
        groups = [rows for rows in (labelled, ~labelled) if bool(rows.any())]
        kd = sum(soft_kl(kd_logits[rows], teacher.logits[rows], options.temperature) for rows in groups)
        if len(groups) == 1:
            kd = 2 * kd
        return options.ce_weight * ce + options.kd_weight * kd

    def meta_step(
        self,
        model: nn.Module,
        train_batch: tuple[torch.Tensor, torch.Tensor, ModelOutputs | None],
        held_out_batch: tuple[torch.Tensor, torch.Tensor],
        state: dict[str, Any],
    ) -> None:
        """Gather the held-out slice over the epoch; after its last batch, grid-search the mix on it.

        The trainer hands batch k of an epoch the positions ``k·B … k·B + B − 1`` of the epoch's
        held-out order, cycled; the first ``H`` positions (H = size of the slice) are each held-out
        row once, so those are kept.
        """
        steps_per_epoch = max(1, int(state["steps"]) // max(1, int(state["epochs"])))
        batch_index = int(state["step"]) - int(state["epoch"]) * steps_per_epoch
        x, y = held_out_batch
        if batch_index == 0:
            self._held = []
        start = batch_index * len(x)
        keep = min(len(x), self._held_count - start)
        if keep > 0:
            self._held.append((x[:keep], y[:keep]))
        if batch_index == steps_per_epoch - 1:
            self.search(model)
            self._held = []

    @torch.no_grad()
    def search(self, model: nn.Module, batch_size: int = 512) -> None:
        """Grid-search the inference mix on the gathered held-out rows; set it on the head and record it."""
        rows = [(x, y) for x, y in self._held if bool((y >= 0).any())]
        if not rows:
            return
        x = torch.cat([x[y >= 0] for x, y in rows])
        y = torch.cat([y[y >= 0] for _, y in rows])
        head = self._dual_head()
        was_training = model.training
        model.eval()
        try:
            ce, kd = [], []
            for start in range(0, len(x), batch_size):
                features = model.forward_features(x[start : start + batch_size])
                ce.append(head.ce(features))
                kd.append(head.kd(features))
        finally:
            model.train(was_training)
        alpha, beta, accuracy = search_mix(torch.cat(ce), torch.cat(kd), y)
        self.mix_alpha.fill_(alpha)
        self.mix_beta.fill_(beta)
        self.mix_accuracy.fill_(accuracy)
        head.alpha, head.beta = alpha, beta

    def finalize(self, student: nn.Module) -> None:
        """Deploy the last searched mix (also after a resume that had no epoch left to run)."""
        head = self.__dict__.get("_head")
        if head is not None and not math.isnan(float(self.mix_alpha)):
            head.alpha, head.beta = float(self.mix_alpha), float(self.mix_beta)

    def record(self) -> dict[str, Any]:
        """The inference mix the deployed head uses and where it came from."""
        searched = not math.isnan(float(self.mix_alpha))
        return {
            "inference_mix": {
                "alpha": round(float(self.mix_alpha), 4) if searched else self.options.inference_alpha,
                "beta": float(self.mix_beta) if searched else self.options.inference_beta,
                "held_out_accuracy": round(float(self.mix_accuracy), 5) if searched else None,
                "source": "grid search on the held-out train slice" if searched else "fixed options",
            }
        }
