"""Training loop shared by teacher training and every distillation method.

Deterministic and resumable: the batch order of epoch ``e`` comes from ``seed`` and ``e`` alone, the
torch generator is reseeded per epoch, and ``latest.pt`` (model, method parts, optimiser, scheduler,
history) is written atomically after every epoch, with a hash of its own content (``torch.load``
checks no CRC, so a byte changed on disk would otherwise load as different weights). A rerun with the
same fingerprint continues from the epoch after the last one saved; a ``latest.pt`` that is truncated
or changed since it was written is ignored with a note (training starts from epoch 1). Training that
diverges (a non-finite loss or weight) stops at the end of that epoch with a :class:`TrainingError`
naming the learning rate to lower, and that epoch is not saved. Both the last-epoch and the
best-epoch accuracy are recorded; the model handed on is the last epoch's (the held-out split is the
evaluation set, so picking the best epoch on it would overstate accuracy).

Under ``torch.distributed`` (:mod:`edgekd.distributed`) the student and the method's trainable parts
train inside one ``DistributedDataParallel``; rank ``r`` of ``N`` takes ``perm[r::N]`` of the epoch's
order in batches of ``batch_size / N`` (``batch_size`` stays the global batch, the learning rate is
unchanged); the epoch's loss is averaged over ranks, divergence and validation accuracy are decided
on rank 0 and broadcast, and rank 0 alone writes ``latest.pt``, between barriers.

A streamed train split (:mod:`edgekd.data.streaming`, an ImageFolder too large for memory) is
decoded and augmented per batch in ``data.workers`` DataLoader processes, whose batch sampler is the
epoch's own seeded order: the batches, and so the losses, are those of the in-memory path.

Device (:mod:`edgekd.accelerator`, ``distill.accelerator``): ``train(..., device=...)`` moves the
student, the method (its connectors, projectors, extra heads and buffers), the live teacher and
every batch (inputs, labels, cached teacher logits and features) to ``device``, and hands the
student and the method back on the device they came on. ``latest.pt`` is device-free (every tensor
saved on the CPU, read back with ``map_location="cpu"``), so a run resumes on another machine. On the
CPU nothing moves and the numbers are those of a CPU-only trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd import distributed
from edgekd.accelerator import module_device, place, to_cpu
from edgekd.atomic import write_torch
from edgekd.console import progress
from edgekd.data.augment import AugmentationBank
from edgekd.data.base import ArrayDataset
from edgekd.data.streaming import BankView, index_batches, load_batches
from edgekd.distill.methods.base import DistillMethod, ModelOutputs
from edgekd.distill.outputs import model_outputs
from edgekd.distill.teacher_cache import TeacherOutputs, compute_teacher_outputs
from edgekd.errors import ModelError, TrainingError, first_line
from edgekd.hashing import sha256_state
from edgekd.recipe import TrainSpec
from edgekd.threads import LoadWindow, rebalance_training_threads

LATEST = "latest.pt"


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    deployed_accuracy: float = 0.0  # held-out accuracy of the finalised (deployed) model

    @property
    def last_accuracy(self) -> float:
        return self.history[-1]["val_accuracy"]

    @property
    def best(self) -> dict[str, float]:
        return max(self.history, key=lambda row: row["val_accuracy"])


@torch.inference_mode()
def predict_accuracy(model: nn.Module, data: ArrayDataset, batch_size: int = 512) -> float:
    model.eval()
    device = module_device(model)  # evaluated where the model is
    correct = 0
    for indices, batch in load_batches(data.x, index_batches(len(data), batch_size)):
        predicted = model(batch.to(device)).argmax(1).cpu().numpy()
        correct += int((predicted == data.y[indices]).sum())
    return correct / max(len(data), 1)


class _TeacherSource:
    """Teacher outputs for a batch: from the cache (by sample and variant), or by running the teacher."""

    def __init__(
        self,
        teacher: nn.Module | None,
        cached: TeacherOutputs | None,
        method: DistillMethod,
        device: torch.device,
    ) -> None:
        self.teacher, self.cached, self.method, self.device = teacher, cached, method, device
        if teacher is not None:
            place(teacher, device).eval()  # an ONNX Runtime teacher stays on the CPU

    def __call__(
        self, indices: np.ndarray, variants: np.ndarray, x: torch.Tensor, live: bool
    ) -> ModelOutputs | None:
        if self.cached is not None and not live:
            feats = self.cached.features
            return ModelOutputs(
                torch.from_numpy(np.asarray(self.cached.logits[variants, indices])).to(self.device),
                torch.from_numpy(np.asarray(feats[variants, indices])).to(self.device)
                if self.method.needs_features
                else None,
            )
        if self.teacher is None:
            return None
        method, x = self.method, x.to(module_device(self.teacher))
        with torch.no_grad():
            out = model_outputs(self.teacher, x, method.needs_features, method.needs_feature_maps)
        if out.logits.device == self.device:
            return out
        return ModelOutputs(  # a teacher that runs elsewhere (ONNX Runtime on the CPU)
            out.logits.to(self.device),
            None if out.features is None else out.features.to(self.device),
            None if out.feature_maps is None else [m.to(self.device) for m in out.feature_maps],
        )


class _LossModule(nn.Module):
    """The student and the method as one module, so one DDP wrapper averages the gradients of both."""

    def __init__(self, model: nn.Module, method: DistillMethod) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(
        self, x: torch.Tensor, teacher: ModelOutputs | None, y: torch.Tensor, state: dict[str, Any]
    ) -> torch.Tensor:
        method = self.method
        outputs = model_outputs(self.model, x, method.needs_features, method.needs_feature_maps)
        return method.loss(outputs, teacher, y, {**state, "inputs": x})


def _loss_function(
    model: nn.Module, method: DistillMethod, trained: list[nn.Parameter], device: torch.device
) -> nn.Module:
    """The loss module, inside ``DistributedDataParallel`` when several processes train.

    Parameters the optimiser does not train (a method's meta-learned parts) are left out of DDP;
    the trainer averages them over ranks after each meta step instead.
    """
    module = _LossModule(model, method)
    if distributed.world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = {id(p) for p in trained}
    ignored = [name for name, p in module.named_parameters() if id(p) not in ids]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
    device_ids = [device.index] if device.type == "cuda" else None  # this rank's cuda:LOCAL_RANK
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)


def _sync_state(model: nn.Module, method: DistillMethod) -> None:
    """Rank 0's buffers (BatchNorm statistics, a method's records) on every rank."""
    distributed.broadcast_([*model.buffers(), *method.buffers()])


def split_held_out(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train-split indices into (fit, held-out), stratified by label; held-out empty for fraction 0."""
    if fraction <= 0:
        return np.arange(len(labels)), np.arange(0)
    rng = np.random.default_rng([seed, 7])
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held.append(members[: max(1, round(fraction * len(members)))])
    held_out = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


MIN_ONE_CYCLE_STEPS = 10  # below this the one-cycle warm-up has no step to rise over


def learning_rate_schedule(
    optimizer: torch.optim.Optimizer, lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle (Smith & Topin, 2019) to ``lr`` over ``total_steps``, 20 % warm-up; a run of fewer than
    :data:`MIN_ONE_CYCLE_STEPS` steps (a smoke test) keeps ``lr`` constant instead."""
    if total_steps < MIN_ONE_CYCLE_STEPS:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.2)


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
    bank: AugmentationBank | None = None,
    label: str = "train",
    log: Callable[[str], None] = print,
    stage: str = "train",
    lr_field: str = "train.lr",
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train ``model`` with ``method``'s loss for ``spec.epochs``, resuming from ``latest.pt``.

    Each epoch visits every fit sample once in a seeded order; with an augmentation ``bank`` each
    visit uses one of the sample's K variants, drawn from the seed and the epoch. Train labels of
    -1 mark unlabelled samples (semi-supervised methods). After the last epoch the method's
    :meth:`~DistillMethod.finalize` turns the student into the deployed model. ``stage`` and
    ``lr_field`` (the recipe field of ``spec.lr``) name what to lower when training diverges.
    ``device`` (default: where ``model`` is) is where training runs; ``model`` and ``method`` come back
    on the device they came on.
    """
    home = module_device(model)
    device = home if device is None else torch.device(device)
    source = _TeacherSource(teacher, teacher_outputs, method, device)
    y_all = torch.from_numpy(train_set.y)
    dataset_outputs = (
        _dataset_teacher_outputs(source, teacher_outputs, train_set.x)
        if method.needs_teacher_dataset
        else None
    )
    method.prepare(model, y_all, dataset_outputs)
    model.to(device)  # after prepare: what a method installs on the student moves with it
    method.to(device)
    method.bind_models(model, source.teacher)  # for methods that run model parts themselves (dmae)
    params = [*model.parameters(), *method.student_parameters()]
    world, rank = distributed.world_size(), distributed.rank()
    local_batch = spec.batch_size // world  # batch_size is the global batch (divisible: checked)
    loss_function = _loss_function(model, method, params, device)
    trained = {id(p) for p in params}
    meta_params = [p for p in method.parameters() if id(p) not in trained]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    fit, held_out = split_held_out(train_set.y, method.held_out_fraction, seed)
    steps_per_epoch = max(1, -(-len(fit) // spec.batch_size))
    total_steps = spec.epochs * steps_per_epoch
    scheduler = learning_rate_schedule(optimizer, spec.lr, total_steps)
    result = TrainResult()
    parts = {"model": model, "method": method, "optimizer": optimizer, "scheduler": scheduler}
    first_epoch = resume_latest(stage_dir / LATEST, fingerprint, parts, result, log)
    with progress() as bar:
        task = bar.add_task(label, total=spec.epochs, completed=first_epoch, status="")
        for epoch in range(first_epoch, spec.epochs):
            load = LoadWindow().start()  # others' CPU use during this epoch sizes the next one's threads
            distributed.test_hook(epoch)
            torch.manual_seed(seed * 100_003 + epoch + 7919 * rank)  # rank 0: the single-process seed
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
            rng = np.random.default_rng([seed, epoch])
            order = distributed.shard(fit[rng.permutation(len(fit))], rank, world)
            variants = (
                rng.integers(0, bank.variants, size=len(train_set)) if bank else np.zeros(len(train_set), int)
            )
            held_order = held_out[rng.permutation(len(held_out))]
            model.train()
            method.train()
            total, batches = 0.0, 0
            steps = [order[start : start + local_batch] for start in range(0, len(order), local_batch)]
            augment = BankView(bank, variants) if bank is not None else None
            loader = load_batches(train_set.x, steps, augment, seed=seed * 100_003 + epoch + 7919 * rank)
            losses: list[torch.Tensor] = []  # summed after the epoch: no device sync per step
            for batch_index, (indices, x) in enumerate(loader):
                batch_variants, y = variants[indices], y_all[indices].to(device)
                x = x.to(device)
                state = {
                    "epoch": epoch,
                    "epochs": spec.epochs,
                    "step": epoch * steps_per_epoch + batch_index,
                    "steps": total_steps,
                }
                mix = method.mix_batch(x, y, generator)
                if mix is not None:
                    lam = mix.lam.view(-1, *([1] * (x.dim() - 1)))
                    x = lam * x + (1 - lam) * x[mix.partner]
                    state["mix"] = mix
                live = mix is not None or method.needs_feature_maps
                teacher_batch = source(indices, batch_variants, x, live) if method.needs_teacher else None
                loss = loss_function(x, teacher_batch, y, state)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if len(held_order):
                    cycle = batch_index * spec.batch_size + np.arange(spec.batch_size)
                    pick = held_order[cycle % len(held_order)]  # the held-out slice, cycled
                    held = torch.from_numpy(np.ascontiguousarray(train_set.x[pick])).to(device)
                    method.meta_step(model, (x, y, teacher_batch), (held, y_all[pick].to(device)), state)
                    distributed.average_(meta_params)  # meta steps saw each rank's own batch
                losses.append(loss.detach())
            for value in torch.stack(losses).cpu().tolist() if losses else []:
                total += value  # in step order, as Python floats: the sum a per-step float() gave
                batches += 1
            total, batches = distributed.all_sum([total, batches])  # the mean over every rank's batches
            _sync_state(model, method)
            verdict = distributed.decide(
                partial(_verdict, total / batches, model, method, stage, epoch, spec, lr_field, val_set)
            )
            if isinstance(verdict, str):
                raise TrainingError(verdict)
            accuracy = verdict
            result.history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": round(total / batches, 5),
                    "val_accuracy": round(accuracy, 5),
                }
            )
            distributed.barrier()
            if distributed.is_main():
                save_latest(
                    stage_dir / LATEST,
                    fingerprint,
                    epoch,
                    model,
                    method,
                    optimizer,
                    result.history,
                    scheduler,
                )
            distributed.barrier()
            bar.update(task, advance=1, status=f"loss {total / batches:.3f}  val acc {accuracy:.3f}")
            rebalance_training_threads(load.stop(), log)
    method.finalize(model)
    result.deployed_accuracy = distributed.decide(lambda: predict_accuracy(model, val_set))
    model.to(home)
    method.to(home)
    return result


def _verdict(
    loss: float,
    model: nn.Module,
    method: DistillMethod,
    stage: str,
    epoch: int,
    spec: TrainSpec,
    lr_field: str,
    val_set: ArrayDataset,
) -> float | str:
    """The epoch's held-out accuracy, or the divergence message (decided on rank 0)."""
    try:
        _check_finite(loss, model, method, stage, epoch, spec, lr_field)
    except TrainingError as exc:
        return str(exc)
    return predict_accuracy(model, val_set)


def _check_finite(
    loss: float,
    model: nn.Module,
    method: DistillMethod,
    stage: str,
    epoch: int,
    spec: TrainSpec,
    lr_field: str,
) -> None:
    """Stop a diverged training: the epoch's mean loss or any weight, buffer or method part non-finite."""
    tensors = [
        *(t for t in model.state_dict().values() if t.is_floating_point()),
        *(p for p in method.student_parameters() if p.is_floating_point()),
    ]
    bad = sum(1 for t in tensors if not bool(torch.isfinite(t).all()))
    if math.isfinite(loss) and bad == 0:
        return
    raise TrainingError(
        f"[{stage}] training diverged in epoch {epoch + 1} of {spec.epochs} (train loss {loss:.4g}, "
        f"{bad} of {len(tensors)} weight tensors not finite); lower {lr_field} (now {spec.lr:g}) and rerun"
    )


def _dataset_teacher_outputs(
    source: _TeacherSource, cached: TeacherOutputs | None, x_all: Any
) -> ModelOutputs:
    """The teacher's logits and embeddings for the whole train split (variant 0), from the cache if any."""
    if cached is not None:
        # copies: the cache is memory-mapped read-only, and torch wants writable arrays
        return ModelOutputs(
            torch.from_numpy(np.array(cached.logits[0])), torch.from_numpy(np.array(cached.features[0]))
        )
    if source.teacher is None:
        raise ValueError(
            "the method needs the teacher's outputs for the train split, but there is no teacher"
        )
    computed = compute_teacher_outputs(source.teacher, x_all, batch_size=512)
    return ModelOutputs(torch.from_numpy(computed.logits[0]), torch.from_numpy(computed.features[0]))


def save_latest(
    path: Path,
    fingerprint: str,
    epoch: int,
    model: nn.Module,
    method: nn.Module,
    optimizer: torch.optim.Optimizer,
    history: list[dict[str, Any]],
    scheduler: Any = None,
) -> None:
    """Write ``latest.pt`` atomically: the training state after ``epoch``, with a hash of its own content
    (also the detection trainer's, which has no ``scheduler``)."""
    state = {
        "fingerprint": fingerprint,
        "epoch": epoch,
        "model": to_cpu(model.state_dict()),  # device-free: resumes on another machine
        "method": to_cpu(method.state_dict()),
        "optimizer": to_cpu(optimizer.state_dict()),
        **({} if scheduler is None else {"scheduler": scheduler.state_dict()}),
        "history": history,
    }
    write_torch(path, {**state, "sha256": sha256_state(state)})


def resume_latest(
    path: Path,
    fingerprint: str,
    parts: dict[str, Any],
    result: Any,
    log: Callable[[str], None],
) -> int:
    """Load ``latest.pt`` if it belongs to this very configuration; return the first epoch to run.

    ``parts`` names what to restore (``model``, ``method``, ``optimizer`` and, where there is one,
    ``scheduler``) by its key in the checkpoint; ``result`` (a train result with ``history`` and
    ``resumed_from_epoch``) takes the recorded history. A checkpoint that cannot be read (truncated),
    that changed since it was written (its content hash differs) or that has the wrong shape is ignored
    with a one-line note: training starts from epoch 1.
    """
    if not path.is_file():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or damaged on disk: the write itself is atomic
        log(f"  ignoring {path}: unreadable ({first_line(exc)}); starting from epoch 1")
        return 0
    if not isinstance(state, dict):
        log(f"  ignoring {path}: not an edgekd training checkpoint; starting from epoch 1")
        return 0
    if state.get("fingerprint") != fingerprint:
        return 0
    recorded = state.pop("sha256", None)
    if recorded is None or recorded != sha256_state(state):
        why = "it records no content hash" if recorded is None else "changed since it was written"
        log(f"  ignoring {path}: {why} (sha256 mismatch); starting from epoch 1")
        return 0
    epoch, history = state.get("epoch"), state.get("history")
    if not isinstance(epoch, int) or not isinstance(history, list):
        log(f"  ignoring {path}: no epoch or history in it; starting from epoch 1")
        return 0
    try:
        for key, part in parts.items():
            part.load_state_dict(state[key])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise ModelError(
            f"{path} does not fit this training ({first_line(exc)}); it is likely from an earlier edgekd "
            "version: delete it to rerun the stage from epoch 1"
        ) from None
    result.history = list(history)
    result.resumed_from_epoch = epoch + 1
    log(f"  resuming from {path.name} after epoch {result.resumed_from_epoch}")
    return result.resumed_from_epoch
