"""Model checkpoints: one torch file holding the architecture name, sizes and weights.

Layout: ``{"model": name, "num_classes": int, "in_channels": int, "state_dict": {...}, **extra}``,
plus ``"head": {...}`` when the model deploys a head other than one linear layer (see
:mod:`edgekd.models.heads`).
Files are written atomically and read with ``torch.load(weights_only=True)``, so a checkpoint can
hold tensors and plain Python values (numbers, strings, lists, dicts) but never arbitrary objects.
Weights saved by other tools load too: a ``.safetensors`` file, or a plain state dict (name ->
tensor) saved with ``torch.save``; they carry no architecture name, so only their tensor names
and shapes are checked (a model may map foreign names with ``adapt_state_dict``, as timm models do).
Every problem with a checkpoint a user passed becomes one :class:`ModelError` line naming the file.
"""

from __future__ import annotations

import errno
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.atomic import write_torch
from edgekd.errors import ModelError, first_line
from edgekd.models.heads import build_head

RESERVED_KEYS = ("model", "num_classes", "in_channels", "state_dict", "head")
_LISTED = 3  # how many offending tensor names an error message lists


def save_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, model_name: str, extra: dict[str, Any] | None = None
) -> None:
    """Write ``model``'s weights under its registry name ``model_name``, plus ``extra`` fields.

    ``num_classes`` is read from ``model.head.out_features``; ``in_channels`` from the model's
    ``in_channels`` attribute. ``extra`` may not reuse the reserved keys.
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"extra checkpoint fields {clash} clash with reserved keys {list(RESERVED_KEYS)}")
    payload = {
        "model": model_name,
        "num_classes": int(model.head.out_features),
        "in_channels": int(model.in_channels),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        **extra,
    }
    if hasattr(model.head, "spec"):
        payload["head"] = model.head.spec()
    write_torch(path, payload)


def _corrupt(file: Path) -> ModelError:
    return ModelError(
        f"checkpoint {file} is truncated or corrupt and cannot be read; re-create it or point to another file"
    )


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint dictionary at ``path``; :class:`ModelError` if missing, corrupt or not ours."""
    file = Path(path)
    if file.is_dir():
        raise ModelError(f"checkpoint {file} is a directory; pass the path of a checkpoint file inside it")
    if not file.is_file():
        raise ModelError(f"checkpoint {file} not found; pass the path of a .pt file written by edgekd")
    if file.stat().st_size == 0:
        raise ModelError(f"checkpoint {file} is empty; re-create it or point to another file")
    if not os.access(file, os.R_OK):
        raise ModelError(f"checkpoint {file} cannot be read (permission denied); check its permissions")
    if file.suffix == ".safetensors":
        return {"model": None, "state_dict": _read_safetensors(file)}
    try:
        with warnings.catch_warnings():  # e.g. torch's multi-line note on a protocol-4 plain pickle
            warnings.simplefilter("ignore")
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError(
            f"checkpoint {file} is corrupt or holds objects other than tensors and plain values "
            "(refused: loading them could run code); re-create it with edgekd or point to another file"
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EIO):
            raise _corrupt(file) from None  # torch reports a damaged zip archive as OSError(EINVAL)
        raise ModelError(
            f"checkpoint {file} cannot be read ({exc.strerror or type(exc).__name__}); "
            "check the file and its permissions"
        ) from None
    except Exception:  # torch raises many types for a damaged file (zip, EOF, runtime errors)
        raise _corrupt(file) from None
    if _is_state_dict(checkpoint):  # a plain state dict saved with torch.save(model.state_dict())
        return {"model": None, "state_dict": dict(checkpoint)}
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ModelError(
            f"checkpoint {file} is neither an edgekd checkpoint (no 'state_dict' mapping) nor a state dict "
            "of tensors; pass a file written by edgekd, a .safetensors file or a saved state_dict"
        )
    for key, value in checkpoint["state_dict"].items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)):
            raise ModelError(
                f"checkpoint {file}: state_dict entry {str(key)[:60]!r} holds a {type(value).__name__}, "
                "not a tensor; re-create the checkpoint with edgekd or point to another file"
            )
    for key in ("num_classes", "in_channels"):
        if key in checkpoint and not isinstance(checkpoint[key], int):
            raise ModelError(
                f"checkpoint {file}: {key!r} is {checkpoint[key]!r:.60}, not an integer; "
                "re-create the checkpoint with edgekd"
            )
    return checkpoint


def load_weights(model: nn.Module, path: str | os.PathLike[str], expected_name: str) -> dict[str, Any]:
    """Load the weights at ``path`` into ``model`` (an ``expected_name`` model); return the checkpoint.

    Raises :class:`ModelError` naming the file when it is missing or corrupt, holds another
    architecture (its recorded name differs, or its tensor names do not match the model's), or a
    tensor's shape differs (e.g. a checkpoint trained for another number of classes).
    """
    checkpoint = load_checkpoint(path)
    saved_name = checkpoint.get("model")
    if saved_name is not None and saved_name != expected_name:
        raise ModelError(
            f"checkpoint {path} holds a {saved_name!r} model, expected {expected_name!r}; "
            f"use a checkpoint of {expected_name!r} or set the model to {saved_name!r}"
        )
    saved: dict[str, torch.Tensor] = checkpoint["state_dict"]
    if saved_name is None and hasattr(model, "adapt_state_dict"):
        saved = model.adapt_state_dict(saved)
    if isinstance(checkpoint.get("head"), dict):
        try:
            model.head = build_head(checkpoint["head"], model.feature_dim, int(checkpoint["num_classes"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(
                f"checkpoint {path}: its 'head' record cannot build a head ({type(exc).__name__}: "
                f"{str(exc)[:80]}); re-create the checkpoint with edgekd"
            ) from None
    own = model.state_dict()
    missing = [key for key in own if key not in saved]
    unexpected = [key for key in saved if key not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise ModelError(
            f"checkpoint {path} does not match the {expected_name!r} architecture: {'; '.join(parts)}"
        )
    for key, tensor in own.items():
        if tuple(saved[key].shape) != tuple(tensor.shape):
            hint = ""
            head = getattr(model, "head", None)
            saved_head = saved.get("head.weight")
            saved_classes = checkpoint.get(
                "num_classes", None if saved_head is None else int(saved_head.shape[0])
            )
            if isinstance(head, nn.Linear) and saved_classes != head.out_features:
                hint = f" (checkpoint for {saved_classes} classes, model built for {head.out_features})"
            raise ModelError(
                f"checkpoint {path} does not fit the model: tensor {key!r} has shape "
                f"{tuple(saved[key].shape)} in the checkpoint but {tuple(tensor.shape)} in the model{hint}"
            )
    try:
        model.load_state_dict(saved)
    except RuntimeError as exc:  # e.g. a tensor whose dtype cannot be copied into the parameter
        raise ModelError(
            f"checkpoint {path} does not load into {expected_name!r}: {first_line(exc)[:160]}"
        ) from None
    return checkpoint


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items())
    )


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (a format that holds only tensors: nothing is executed)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise ModelError(
            f"checkpoint {file} is not a readable safetensors file ({reason}); "
            "re-create it or point to another file"
        ) from None


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return f"{len(names)} tensor(s): {shown}{more}"
