"""Teacher outputs computed once per (teacher weights, data, augmentation bank) and reused.

Logits and penultimate features of every (variant, sample) pair are stored as ``.npy`` files of
shape (K, N, ·) under a directory keyed by the hash of the teacher checkpoint, the dataset
fingerprint and the augmentation bank's settings, so every logit- or embedding-based method and
every later run with the same teacher, data and bank reuses them; they are read back memory-mapped.
Without augmentation K = 1 (the samples themselves).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd import atomic
from edgekd.console import progress
from edgekd.data.augment import AugmentationBank
from edgekd.hashing import sha256_json


@dataclass
class TeacherOutputs:
    """Teacher logits (K, N, C) and penultimate features (K, N, D) per (variant, sample)."""

    logits: np.ndarray
    features: np.ndarray


@torch.inference_mode()
def compute_teacher_outputs(
    teacher: nn.Module, x: np.ndarray, batch_size: int, bank: AugmentationBank | None = None
) -> TeacherOutputs:
    """Run ``teacher`` on every variant of every sample of ``x`` (N, ...), in order."""
    teacher.eval()
    variants = bank.variants if bank is not None else 1
    logits, features = [], []
    with progress() as bar:
        task = bar.add_task("teacher outputs", total=variants * len(x), status="")
        for variant in range(variants):
            for start in range(0, len(x), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
                if bank is not None:
                    indices = np.arange(start, start + len(batch))
                    batch = bank.apply(batch, indices, np.full(len(batch), variant))
                feats = teacher.forward_features(batch)
                logits.append(teacher.head(feats).numpy())
                features.append(feats.numpy())
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
) -> tuple[TeacherOutputs, bool]:
    """Teacher outputs for ``x`` from ``cache_dir/key`` if present, else computed and stored.

    Returns the outputs and whether they came from the cache.
    """
    folder = cache_dir / key
    logits_path, features_path = folder / "logits.npy", folder / "features.npy"
    expected = (bank.variants if bank is not None else 1, len(x))
    if logits_path.is_file() and features_path.is_file():
        logits = np.load(logits_path, mmap_mode="r")
        if logits.shape[:2] == expected:
            return TeacherOutputs(logits, np.load(features_path, mmap_mode="r")), True
    outputs = compute_teacher_outputs(teacher, x, batch_size, bank)
    _save_npy(features_path, outputs.features)
    _save_npy(logits_path, outputs.logits)
    return outputs, False


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
