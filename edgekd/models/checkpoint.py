"""Checkpoints: our own format, written atomically and read without unpickling code.

A checkpoint is ``{"model": name, "num_classes", "in_channels", "state_dict", **extra}`` saved with
``torch.save`` and loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.atomic import atomic_path
from edgekd.errors import ModelError


def save_checkpoint(path: Path, model: nn.Module, model_name: str, extra: dict[str, Any]) -> None:
    payload = {
        "model": model_name,
        "num_classes": getattr(model, "num_classes", None),
        "in_channels": getattr(model, "in_channels", None),
        "state_dict": model.state_dict(),
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} not found; pass an existing file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, or a pickle with code in it
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"checkpoint {path} cannot be read ({reason}); is it truncated or not a torch file?"
        ) from None
    if (
        isinstance(payload, dict)
        and "state_dict" not in payload
        and all(isinstance(v, torch.Tensor) for v in payload.values())
    ):
        payload = {"model": None, "state_dict": payload}  # a bare state_dict, as many tools save
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ModelError(f"checkpoint {path} is not a state_dict or an edgekd checkpoint")
    return payload


def load_weights(model: nn.Module, path: Path, expected_name: str) -> dict[str, Any]:
    """Load ``path`` into ``model`` (built as ``expected_name``); one clear ModelError on any mismatch."""
    payload = load_checkpoint(path)
    saved_name = payload.get("model")
    if saved_name is not None and saved_name != expected_name:
        raise ModelError(
            f"checkpoint {path} holds a {saved_name} model, not {expected_name}; "
            f"pass a checkpoint of {expected_name} or set the model to {saved_name}"
        )
    state, own = payload["state_dict"], model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ModelError(
            f"checkpoint {path} does not match {expected_name}: "
            f"missing {len(missing)} tensor(s) {missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}"
        )
    for key, tensor in own.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ModelError(
                f"checkpoint {path} does not match {expected_name}: {key} has shape "
                f"{tuple(state[key].shape)} in the file but {tuple(tensor.shape)} in the model "
                f"(trained with another number of classes or input channels?)"
            )
    model.load_state_dict(state)
    return payload
