"""Where the teacher and distill stages train: ``distill.accelerator`` (auto | cpu | cuda).

``auto`` trains on CUDA when ``torch.cuda.is_available()``, else on the CPU; ``cuda`` without a CUDA
device is a one-line :class:`RecipeError` in the preflight, before any training. The setting covers
teacher training, distillation and the teacher-output pass; export, quantisation and every later
stage stay on the CPU and read the same device-free checkpoints (state dicts are saved on the CPU and
loaded with ``map_location="cpu"``, so a run also resumes on another machine).

Under ``torch.distributed`` each rank trains on ``cuda:LOCAL_RANK`` with the NCCL backend, and on the
CPU with gloo (data-parallel training as in Li et al., "PyTorch Distributed: Experiences on
Accelerating Data Parallel Training", VLDB 2020). A run on CUDA is not bit-identical to the CPU one
(other kernels, another dropout generator): the stage fingerprints record ``device: cuda`` when the
stage trains on CUDA, so a CPU run and a CUDA run never share a checkpoint or a stored teacher; a
CPU run keeps the fingerprint it always had.

An ONNX teacher (``onnx:FILE``) runs on ONNX Runtime's CPU provider wherever the student trains;
its outputs are moved to the training device.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from edgekd.errors import RecipeError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from edgekd.recipe import Recipe

ACCELERATORS = ("auto", "cpu", "cuda")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def device_kind(accelerator: str) -> str:
    """``"cuda"`` or ``"cpu"``: what ``accelerator`` resolves to here (no error, for fingerprints)."""
    if accelerator == "cuda" or (accelerator == "auto" and _cuda_available()):
        return "cuda"
    return "cpu"


def check(recipe: Recipe, processes_per_node: int | None = None) -> None:
    """The preflight's check: ``distill.accelerator: cuda`` needs a CUDA device, and on CUDA every
    process of this node needs its own device (``processes_per_node``, default the world size)."""
    accelerator = recipe.distill.accelerator
    if device_kind(accelerator) == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise RecipeError(
            "distill.accelerator = cuda but torch sees no CUDA device here (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); train with "
            "--set distill.accelerator=cpu (or auto), or run on a machine with an NVIDIA GPU"
        )
    per_node = processes_per_node or recipe.distill.world_size
    count = torch.cuda.device_count()
    if per_node > count:
        raise RecipeError(
            f"distill.world_size = {recipe.distill.world_size} puts {per_node} processes on this node but "
            f"it has {count} CUDA device(s) (one per process): use --nproc {count}, or "
            "--set distill.accelerator=cpu to train on the CPU"
        )


def training_device(accelerator: str) -> torch.device:
    """The device this process trains on: the CPU, ``cuda:0`` alone, or ``cuda:LOCAL_RANK`` as a rank
    of a process group (``LOCAL_RANK`` as ``torch.distributed.run`` sets it)."""
    import torch

    if device_kind(accelerator) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RecipeError(
            "distill.accelerator = cuda but torch sees no CUDA device here; train with "
            "--set distill.accelerator=cpu (or auto), or run on a machine with an NVIDIA GPU"
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise RecipeError(
            f"process of local rank {local} has no CUDA device of its own (this node has "
            f"{torch.cuda.device_count()}): use --nproc {torch.cuda.device_count()} or "
            "--set distill.accelerator=cpu"
        )
    return torch.device("cuda", local)


def describe(device: torch.device) -> str:
    """``"cpu"`` or ``"cuda:0 (NVIDIA H100 80GB HBM3)"``: what the stage outputs record."""
    if device.type != "cuda":
        return device.type
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (else buffer); the CPU for a module with neither."""
    import torch

    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def runs_on_cpu(module: nn.Module) -> bool:
    """Whether ``module`` computes on the CPU wherever its tensors live (an ONNX Runtime teacher)."""
    from edgekd.models.onnx_teacher import OnnxTeacher

    return isinstance(module, OnnxTeacher)


def place(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` on ``device`` (in place), except a module that runs on the CPU (left there)."""
    return module if runs_on_cpu(module) else module.to(device)


def to_cpu(state: Any) -> Any:
    """A nested checkpoint state (dicts, lists, tuples of tensors and plain values) with every tensor on
    the CPU. What holds no tensor elsewhere is returned as it is (the same objects: a CPU run saves
    exactly what it saved before); a state dict keeps its type and ``_metadata``."""
    import torch

    if isinstance(state, torch.Tensor):
        return state if state.device.type == "cpu" else state.detach().cpu()
    if isinstance(state, dict):
        items = [(key, value, to_cpu(value)) for key, value in state.items()]
        if all(new is old for _, old, new in items):
            return state
        moved = type(state)((key, new) for key, _, new in items)
        if hasattr(state, "_metadata"):
            moved._metadata = state._metadata  # type: ignore[attr-defined]
        return moved
    if isinstance(state, list | tuple):
        values = [to_cpu(value) for value in state]
        if all(new is old for new, old in zip(values, state, strict=True)):
            return state
        return type(state)(values)
    return state
