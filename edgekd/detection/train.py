"""Training loop for DETR detectors: the teacher on DETR's set loss, the student under a detection method.

One loop for every method, so the methods differ only in their loss
(:meth:`edgekd.detection.distill.DetectionMethod.loss`; ``none`` is the set loss alone). The
optimiser is DAB-DETR's recipe (Liu et al., "DAB-DETR: Dynamic Anchor Boxes are Better Queries for
DETR", ICLR 2022, arXiv:2201.12329): AdamW at ``train.lr`` (DAB-DETR: 1e-4) with weight decay
``train.weight_decay`` (1e-4), gradients clipped at norm 0.1, and the learning rate dropped tenfold
for the last fifth of the epochs (DAB-DETR: at epoch 40 of 50). DAB-DETR trains the backbone at a
tenth of the lr because it starts from ImageNet weights; ours start from random weights (no
download), so the backbone takes the same lr as the rest (as ``benchmarks/detr_kd.py`` does). The
method's own parameters (CLoCKDistill's adapter) train with the student at the same lr.

Deterministic and resumable like :mod:`edgekd.distill.trainer`: the batch order of epoch ``e``
comes from the seed and ``e`` alone, torch is reseeded per epoch, and ``latest.pt`` (model, method,
optimiser, history, with a hash of its own content) is written atomically after every epoch; a
rerun with the same stage fingerprint continues after the last saved epoch, and a damaged
``latest.pt`` is ignored with a note. A non-finite loss stops training with one
:class:`~edgekd.errors.TrainingError` line naming the learning rate to lower. Every epoch is scored
on the held-out split with COCO mAP@[.5:.95] and mAP@.5 (:mod:`edgekd.detection.metrics`, top-100
sigmoid detections per image); the history records both, the model handed on is the last epoch's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd.console import progress
from edgekd.detection.data import DetectionDataset
from edgekd.detection.distill import DetectionMethod, teacher_memory_bytes
from edgekd.detection.metrics import DetectionScores, evaluate_dataset, postprocess
from edgekd.distill.trainer import resume_latest, save_latest
from edgekd.errors import TrainingError
from edgekd.recipe import TrainSpec

LATEST = "latest.pt"
GRAD_CLIP = 0.1  # DAB-DETR's --clip_max_norm
LR_DROP_AT = 0.8  # share of the epochs after which the lr drops tenfold (DAB-DETR: 40 of 50)
EVAL_BATCH = 64
#: Largest teacher-memory cache kept in RAM (float32); a larger one runs the teacher live every step.
MEMORY_CACHE_LIMIT_BYTES = 2 * 1024**3


def build_detector(
    name: str,
    meta: Any,
    role: str,
    kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """The registered DETR ``name`` for the dataset ``meta`` (its classes and input shape), built with
    ``task="detection"`` and the recipe section's factory ``kwargs``."""
    from edgekd.models import build_model

    return build_model(
        name,
        num_classes=len(meta.classes),
        in_channels=meta.input_shape[0],
        pretrained=pretrained,
        role=role,
        input_shape=tuple(meta.input_shape),
        kwargs={**(kwargs or {}), "task": "detection"},
    )


@dataclass
class DetectionTrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1]

    @property
    def best(self) -> dict[str, float]:
        return max(self.history, key=lambda row: row["val_map"])


def targets_of(
    data: DetectionDataset, index: np.ndarray, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """The set-loss targets of images ``index``: ``{"labels" (n,), "boxes" (n, 4) cxcywh in [0, 1]}``."""
    return [
        {
            "labels": torch.as_tensor(data.labels[i], device=device),
            "boxes": torch.as_tensor(data.boxes[i], device=device),
        }
        for i in index
    ]


@torch.inference_mode()
def evaluate_model(model: nn.Module, data: DetectionDataset, batch_size: int = EVAL_BATCH) -> DetectionScores:
    """COCO mAP of ``model`` (a DETR, evaluated where it is) on ``data``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    detections = []
    for first in range(0, len(data), batch_size):
        out = model(torch.from_numpy(data.images[first : first + batch_size]).to(device))
        detections += postprocess(out["logits"].float().cpu(), out["boxes"].float().cpu())
    model.train(was_training)
    return evaluate_dataset(data, detections)


@torch.inference_mode()
def teacher_memories(
    teacher: nn.Module, data: DetectionDataset, device: torch.device, batch_size: int = EVAL_BATCH
) -> torch.Tensor:
    """The frozen teacher's encoder memory of every image of ``data``, (N, HW, d) float32 on ``device``:
    the cache that replaces its backbone and encoder during distillation (the images are fixed: no
    detection augmentation), as :mod:`edgekd.detection.distill`'s docstring measures."""
    teacher.eval()
    parts = [
        teacher.encode(torch.from_numpy(data.images[first : first + batch_size]).to(device))[0].float()
        for first in range(0, len(data), batch_size)
    ]
    return torch.cat(parts)


def _memory_cache(
    teacher: nn.Module | None, data: DetectionDataset, device: torch.device, log: Callable[[str], None]
) -> torch.Tensor | None:
    """The teacher-memory cache of ``data``, or None where there is no teacher or it would not fit."""
    if teacher is None:
        return None
    size = len(data) * teacher_memory_bytes(teacher.d_model, data.image_size, teacher.stride)  # float32
    if size > MEMORY_CACHE_LIMIT_BYTES:
        log(
            f"  teacher memory of {len(data)} images is {size / 1024**3:.1f} GiB, over the "
            f"{MEMORY_CACHE_LIMIT_BYTES / 1024**3:.0f} GiB cache limit: the teacher runs every step"
        )
        return None
    start = time.perf_counter()
    cache = teacher_memories(teacher, data, device)
    log(f"  teacher memory cached: {size / 1024**2:.0f} MiB in {time.perf_counter() - start:.1f} s")
    return cache


def _score(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 5)


def train_detector(
    model: nn.Module,
    method: DetectionMethod,
    train_set: DetectionDataset,
    val_set: DetectionDataset,
    spec: TrainSpec,
    seed: int,
    stage_dir: Path,
    fingerprint: str,
    teacher: nn.Module | None = None,
    label: str = "train",
    log: Callable[[str], None] = print,
    stage: str = "train",
    lr_field: str = "train.lr",
    device: torch.device | str | None = None,
    cache_teacher: bool = True,
) -> DetectionTrainResult:
    """Train ``model`` by ``method`` for ``spec.epochs`` epochs, resuming from ``stage_dir/latest.pt``.

    ``teacher`` (frozen, eval mode) is what the method distils from (None for ``none``). With
    ``cache_teacher`` its encoder memory of every training image is computed once
    (:func:`teacher_memories`, up to :data:`MEMORY_CACHE_LIMIT_BYTES`) and only its decoder runs per
    step. ``stage`` and ``lr_field`` name what to lower when training diverges. ``device`` (default:
    the CPU) is where training runs; the model comes back on the CPU.
    """
    device = torch.device(device or "cpu")
    model.to(device)
    method.to(device)
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    params = [*model.parameters(), *method.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_set) / spec.batch_size))
    drop_epoch = round(LR_DROP_AT * spec.epochs) if spec.epochs > 1 else spec.epochs  # lr drops after it
    result = DetectionTrainResult()
    parts = {"model": model, "method": method, "optimizer": optimizer}
    first_epoch = resume_latest(stage_dir / LATEST, fingerprint, parts, result, log)
    remaining = first_epoch < spec.epochs
    cache = _memory_cache(teacher, train_set, device, log) if cache_teacher and remaining else None
    with progress() as bar:
        task = bar.add_task(label, total=spec.epochs, completed=first_epoch, status="")
        for epoch in range(first_epoch, spec.epochs):
            lr = spec.lr * (0.1 if epoch >= drop_epoch else 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(seed * 100_003 + epoch)
            order = np.random.default_rng([seed, epoch]).permutation(len(train_set))
            model.train()
            method.train()
            start = time.perf_counter()
            sums: dict[str, list[torch.Tensor]] = {"loss": [], "set": [], "memory": [], "logit": []}
            for first in range(0, len(order), spec.batch_size):
                index = order[first : first + spec.batch_size]
                images = torch.from_numpy(train_set.images[index]).to(device)
                memory = None if cache is None else cache[torch.from_numpy(index).to(device)]
                terms = method.loss(images, targets_of(train_set, index, device), model, teacher, memory)
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
                optimizer.step()
                for key in sums:
                    sums[key].append(terms[key].detach())
            means = {key: float(torch.stack(values).mean()) for key, values in sums.items()}
            if not math.isfinite(means["loss"]) or not all(bool(torch.isfinite(p).all()) for p in params):
                raise TrainingError(
                    f"{stage}: training diverged in epoch {epoch + 1} (loss {means['loss']}); lower "
                    f"{lr_field} (now {spec.lr:g}), e.g. --set {lr_field}={spec.lr / 3:.2g}"
                )
            train_s = time.perf_counter() - start
            scores = evaluate_model(model, val_set)
            row = {
                "epoch": epoch + 1,
                "train_loss": round(means["loss"], 5),
                "set_loss": round(means["set"], 5),
                "memory_loss": round(means["memory"], 5),
                "logit_loss": round(means["logit"], 5),
                "lr": lr,
                "val_map": _score(scores.map),
                "val_map50": _score(scores.map50),
                "train_s": round(train_s, 2),
                "steps": steps_per_epoch,
            }
            result.history.append(row)
            save_latest(stage_dir / LATEST, fingerprint, epoch, model, method, optimizer, result.history)
            status = f"loss {means['loss']:.3f}  val mAP {scores.map:.3f}  mAP50 {scores.map50:.3f}"
            bar.update(task, advance=1, status=status)
    model.to("cpu")
    method.to("cpu")
    if teacher is not None:
        teacher.to("cpu")
    return result
