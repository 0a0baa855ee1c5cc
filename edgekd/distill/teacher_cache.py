"""Teacher outputs computed once per (teacher weights, data) and reused for every student epoch.

Logits and penultimate features are stored as ``.npy`` files under a directory keyed by the hash of
the teacher checkpoint and the dataset fingerprint, so every method (logit- or feature-based) and
every later run with the same teacher and data reuses them; they are read back memory-mapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgekd import atomic
from edgekd.hashing import sha256_json


@dataclass
class TeacherOutputs:
    """Per-sample teacher logits (N, C) and penultimate features (N, D)."""

    logits: np.ndarray
    features: np.ndarray


@torch.inference_mode()
def compute_teacher_outputs(teacher: nn.Module, x: np.ndarray, batch_size: int) -> TeacherOutputs:
    teacher.eval()
    logits, features = [], []
    for start in range(0, len(x), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
        feats = teacher.forward_features(batch)
        logits.append(teacher.head(feats).numpy())
        features.append(feats.numpy())
    return TeacherOutputs(np.concatenate(logits), np.concatenate(features))


def cache_key(teacher_sha256: str, data_fingerprint: str) -> str:
    return sha256_json({"teacher": teacher_sha256, "data": data_fingerprint})[:16]


def cached_teacher_outputs(
    teacher: nn.Module, x: np.ndarray, cache_dir: Path, key: str, batch_size: int = 512
) -> tuple[TeacherOutputs, bool]:
    """Teacher outputs for ``x`` from ``cache_dir/key`` if present, else computed and stored.

    Returns the outputs and whether they came from the cache.
    """
    folder = cache_dir / key
    logits_path, features_path = folder / "logits.npy", folder / "features.npy"
    if logits_path.is_file() and features_path.is_file():
        logits = np.load(logits_path, mmap_mode="r")
        if len(logits) == len(x):
            return TeacherOutputs(logits, np.load(features_path, mmap_mode="r")), True
    outputs = compute_teacher_outputs(teacher, x, batch_size)
    _save_npy(features_path, outputs.features)
    _save_npy(logits_path, outputs.logits)
    return outputs, False


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
