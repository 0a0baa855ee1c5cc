"""Teacher outputs computed once per (teacher weights, data, augmentation bank) and reused.

Logits and penultimate features of every (variant, sample) pair are stored as ``.npy`` files of
shape (K, N, ·) under a directory keyed by the hash of the teacher checkpoint, the dataset
fingerprint and the augmentation bank's settings, so every logit- or embedding-based method and
every later run with the same teacher, data and bank reuses them; they are read back memory-mapped.
Without augmentation K = 1 (the samples themselves). ``entry.json``, written last, records each
file's SHA-256 and shape: an entry without it (a killed write), truncated, or whose files changed
since they were written is recomputed, with a one-line note saying why.

A streamed train split (:mod:`edgekd.data.streaming`) is decoded, and each variant of the bank
applied, in DataLoader worker processes, batch by batch in order.

The teacher runs where it is (:mod:`edgekd.accelerator`: the stage places it on ``distill.accelerator``'s
device; an ONNX Runtime teacher on the CPU): each batch is moved there and its outputs come back to
the CPU, so the entry is the same files whatever device computed it (up to float rounding).

Under ``torch.distributed`` (:func:`shared_teacher_outputs`) rank 0 alone computes and writes an
entry; after a barrier every rank memory-maps it. The key never depends on the rank.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd import atomic, distributed
from edgekd.accelerator import module_device
from edgekd.console import progress
from edgekd.data.augment import AugmentationBank
from edgekd.data.streaming import BankView, FileArray, index_batches, load_batches
from edgekd.errors import OutputError, first_line
from edgekd.hashing import sha256_file, sha256_json

ENTRY_FILE = "entry.json"
_ARRAYS = ("logits", "features")


@dataclass
class TeacherOutputs:
    """Teacher logits (K, N, C) and penultimate features (K, N, D) per (variant, sample)."""

    logits: np.ndarray
    features: np.ndarray


@torch.inference_mode()
def compute_teacher_outputs(
    teacher: nn.Module, x: np.ndarray | FileArray, batch_size: int, bank: AugmentationBank | None = None
) -> TeacherOutputs:
    """Run ``teacher`` on every variant of every sample of ``x`` (N, ...), in order.

    ``x`` is an array or a streamed :class:`~edgekd.data.streaming.FileArray` (decoded, and
    augmented, per batch in its DataLoader workers).
    """
    teacher.eval()
    device = module_device(teacher)
    variants = bank.variants if bank is not None else 1
    logits, features = [], []
    with progress() as bar:
        task = bar.add_task("teacher outputs", total=variants * len(x), status="")
        for variant in range(variants):
            augment = BankView(bank, np.full(len(x), variant)) if bank is not None else None
            for _, batch in load_batches(x, index_batches(len(x), batch_size), augment, seed=variant):
                feats = teacher.forward_features(batch.to(device))
                logits.append(teacher.head(feats).cpu().numpy())
                features.append(feats.cpu().numpy())
                bar.update(task, advance=len(batch))
    shape = (variants, len(x))
    return TeacherOutputs(
        np.concatenate(logits).reshape(*shape, -1), np.concatenate(features).reshape(*shape, -1)
    )


def cache_key(teacher_sha256: str, data_fingerprint: str, augment: dict[str, Any] | None = None) -> str:
    """Cache directory name for a teacher file hash, a dataset fingerprint and the bank's settings."""
    return sha256_json({"teacher": teacher_sha256, "data": data_fingerprint, "augment": augment})[:16]


def cached_teacher_outputs(
    teacher: nn.Module,
    x: np.ndarray,
    cache_dir: Path,
    key: str,
    bank: AugmentationBank | None = None,
    batch_size: int = 512,
    log: Callable[[str], None] = print,
) -> tuple[TeacherOutputs, bool]:
    """Teacher outputs for ``x`` from ``cache_dir/key`` if present and intact, else computed and stored.

    Returns the outputs and whether they came from the cache. A damaged entry is recomputed (and
    ``log`` says why); a cache directory that cannot be written is an :class:`OutputError`.
    """
    folder = cache_dir / key
    atomic.remove_stale_temps(folder)
    expected = (bank.variants if bank is not None else 1, len(x))
    cached, why = _read_entry(folder, expected)
    if cached is not None:
        return cached, True
    if why is not None:
        log(f"  teacher cache {key}: {why}; recomputing")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ENTRY_FILE).unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot write the teacher cache {folder}: {exc.strerror or exc}; make {cache_dir} a writable "
            "directory, or turn the cache off with --set distill.teacher_cache=false"
        ) from None
    outputs = compute_teacher_outputs(teacher, x, batch_size, bank)
    entry: dict[str, Any] = {}
    for name in _ARRAYS:
        array = getattr(outputs, name)
        path = folder / f"{name}.npy"
        _save_npy(path, array)
        entry[name] = {"file": path.name, "shape": list(array.shape), "sha256": sha256_file(path)}
    atomic.write_json(folder / ENTRY_FILE, entry)
    return outputs, False


def shared_teacher_outputs(
    teacher: nn.Module,
    x: np.ndarray,
    cache_dir: Path,
    key: str,
    bank: AugmentationBank | None = None,
    batch_size: int = 512,
    log: Callable[[str], None] = print,
) -> tuple[TeacherOutputs, bool]:
    """:func:`cached_teacher_outputs` for every rank of a process group: rank 0 builds the entry,
    then every rank (rank 0 included) reads it back memory-mapped. One process: the same as
    :func:`cached_teacher_outputs`."""
    if not distributed.is_active():
        return cached_teacher_outputs(teacher, x, cache_dir, key, bank, batch_size, log)
    hit = distributed.decide(
        lambda: cached_teacher_outputs(teacher, x, cache_dir, key, bank, batch_size, log)[1]
    )
    distributed.barrier()
    expected = (bank.variants if bank is not None else 1, len(x))
    outputs, why = _read_entry(cache_dir / key, expected)
    if outputs is None:
        raise OutputError(
            f"rank {distributed.rank()} cannot read the teacher cache {cache_dir / key} that rank 0 wrote "
            f"({why or 'it is not there'}); with several nodes, runs_dir and its ../cache must be on a "
            "filesystem every node shares"
        )
    return outputs, hit


def _read_entry(folder: Path, expected: tuple[int, int]) -> tuple[TeacherOutputs | None, str | None]:
    """The entry's arrays (memory-mapped) if every file is there with its recorded hash and shape.

    Otherwise None and why it cannot be used (None as well when there is no entry at all).
    """
    paths = {name: folder / f"{name}.npy" for name in _ARRAYS}
    if not any(path.exists() for path in [*paths.values(), folder / ENTRY_FILE]):
        return None, None
    try:
        entry = json.loads((folder / ENTRY_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{ENTRY_FILE} is missing (an interrupted write, or an older edgekd)"
    except (OSError, ValueError) as exc:
        return None, f"{ENTRY_FILE} is unreadable ({type(exc).__name__})"
    arrays: dict[str, np.ndarray] = {}
    for name, path in paths.items():
        record = entry.get(name) if isinstance(entry, dict) else None
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            return None, f"{ENTRY_FILE} has no sha256 for {path.name}"
        if not path.is_file():
            return None, f"{path.name} is missing"
        try:
            if sha256_file(path) != record["sha256"]:
                return None, f"{path.name} changed since it was written (sha256 mismatch)"
            arrays[name] = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            return None, f"{path.name} is unreadable ({first_line(exc)})"
        if arrays[name].shape[:2] != expected or list(arrays[name].shape) != record.get("shape"):
            return None, f"{path.name} has shape {arrays[name].shape}, expected {expected} in front"
    return TeacherOutputs(arrays["logits"], arrays["features"]), None


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
