"""Training loop shared by teacher training and every distillation method.

Deterministic and resumable: the batch order of epoch ``e`` comes from ``seed`` and ``e`` alone, the
torch generator is reseeded per epoch, and ``latest.pt`` (model, method parts, optimiser, scheduler,
history) is written atomically after every epoch. A rerun with the same fingerprint continues from
the epoch after the last one saved. Both the last-epoch and the best-epoch accuracy are recorded;
the model handed on is the last epoch's (the held-out split is the evaluation set, so picking the
best epoch on it would overstate accuracy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd.atomic import atomic_path
from edgekd.console import progress
from edgekd.data.base import ArrayDataset
from edgekd.distill.methods.base import DistillMethod, ModelOutputs
from edgekd.distill.teacher_cache import TeacherOutputs
from edgekd.recipe import TrainSpec

LATEST = "latest.pt"


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0

    @property
    def last_accuracy(self) -> float:
        return self.history[-1]["val_accuracy"]

    @property
    def best(self) -> dict[str, float]:
        return max(self.history, key=lambda row: row["val_accuracy"])


@torch.inference_mode()
def predict_accuracy(model: nn.Module, data: ArrayDataset, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        batch = torch.from_numpy(data.x[start : start + batch_size])
        correct += int((model(batch).argmax(1).numpy() == data.y[start : start + batch_size]).sum())
    return correct / max(len(data), 1)


def _outputs(model: nn.Module, x: torch.Tensor, with_features: bool) -> ModelOutputs:
    features = model.forward_features(x)
    return ModelOutputs(model.head(features), features if with_features else None)


class _TeacherSource:
    """Teacher outputs for a batch of train indices: from the cache, or by running the teacher."""

    def __init__(self, teacher: nn.Module | None, cached: TeacherOutputs | None, with_features: bool) -> None:
        self.teacher, self.cached, self.with_features = teacher, cached, with_features
        if teacher is not None:
            teacher.eval()

    def __call__(self, indices: np.ndarray, x: torch.Tensor) -> ModelOutputs | None:
        if self.cached is not None:
            feats = self.cached.features
            return ModelOutputs(
                torch.from_numpy(np.asarray(self.cached.logits[indices])),
                torch.from_numpy(np.asarray(feats[indices]))
                if self.with_features and feats is not None
                else None,
            )
        if self.teacher is None:
            return None
        with torch.no_grad():
            return _outputs(self.teacher, x, self.with_features)


def train(
    model: nn.Module,
    method: DistillMethod,
    train_set: ArrayDataset,
    val_set: ArrayDataset,
    spec: TrainSpec,
    seed: int,
    stage_dir: Path,
    fingerprint: str,
    teacher: nn.Module | None = None,
    teacher_outputs: TeacherOutputs | None = None,
    label: str = "train",
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``model`` with ``method``'s loss for ``spec.epochs``, resuming from ``latest.pt``."""
    params = [*model.parameters(), *method.parameters()]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = max(1, -(-len(train_set) // spec.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.lr, total_steps=spec.epochs * steps_per_epoch, pct_start=0.2
    )
    result = TrainResult()
    first_epoch = _resume(stage_dir / LATEST, fingerprint, model, method, optimizer, scheduler, result, log)
    source = _TeacherSource(teacher, teacher_outputs, method.needs_features)
    x_all, y_all = torch.from_numpy(train_set.x), torch.from_numpy(train_set.y)

    with progress() as bar:
        task = bar.add_task(label, total=spec.epochs, completed=first_epoch, status="")
        for epoch in range(first_epoch, spec.epochs):
            torch.manual_seed(seed * 100_003 + epoch)
            order = np.random.default_rng([seed, epoch]).permutation(len(train_set))
            model.train()
            method.train()
            total, batches = 0.0, 0
            for start in range(0, len(order), spec.batch_size):
                indices = order[start : start + spec.batch_size]
                x, y = x_all[indices], y_all[indices]
                loss = method.loss(
                    _outputs(model, x, method.needs_features),
                    source(indices, x) if method.needs_teacher else None,
                    y,
                    {"epoch": epoch, "epochs": spec.epochs},
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += float(loss.detach())
                batches += 1
            accuracy = predict_accuracy(model, val_set)
            result.history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": round(total / batches, 5),
                    "val_accuracy": round(accuracy, 5),
                }
            )
            _save_latest(stage_dir / LATEST, fingerprint, epoch, model, method, optimizer, scheduler, result)
            bar.update(task, advance=1, status=f"loss {total / batches:.3f}  val acc {accuracy:.3f}")
    return result


def _save_latest(
    path: Path,
    fingerprint: str,
    epoch: int,
    model: nn.Module,
    method: DistillMethod,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    result: TrainResult,
) -> None:
    state = {
        "fingerprint": fingerprint,
        "epoch": epoch,
        "model": model.state_dict(),
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": result.history,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume(
    path: Path,
    fingerprint: str,
    model: nn.Module,
    method: DistillMethod,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    result: TrainResult,
    log: Callable[[str], None],
) -> int:
    """Load ``latest.pt`` if it belongs to this very configuration; return the first epoch to run."""
    if not path.is_file():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a checkpoint from a crash mid-write cannot exist (atomic), but be safe
        log(f"  ignoring unreadable {path}; starting from epoch 1")
        return 0
    if state.get("fingerprint") != fingerprint:
        return 0
    model.load_state_dict(state["model"])
    method.load_state_dict(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    result.history = list(state["history"])
    result.resumed_from_epoch = state["epoch"] + 1
    log(f"  resuming from {path.name} after epoch {result.resumed_from_epoch}")
    return result.resumed_from_epoch
