"""Trained teachers kept across runs, content-addressed by everything that made them.

Training the teacher is usually the longest stage, and it is the same work whenever the teacher's
architecture, its training settings, the seed and the data are the same: another student, method,
target or run name does not change it. A teacher trained on the labels is published to
``<store>/<key>/`` (``teacher.pt`` and, written last, ``entry.json`` with its SHA-256, accuracy and
history), where ``key`` hashes the model name and factory arguments, ``teacher.train``, the seed, the
dataset's content fingerprint, the torch version and the SHA-256 of the code that built and trained
it (the model's source file, the training loop and the label loss). A later run with the same key
loads it instead of training; an entry whose file no longer matches its recorded hash is ignored
(and retrained over). ``teacher.store: false`` always trains.

The store is ``<runs_dir>/../cache/teachers`` (``models/cache/teachers`` by default), next to the
teacher-output cache.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd import atomic
from edgekd.distill import trainer
from edgekd.distill.methods import supervised
from edgekd.hashing import sha256_file, sha256_json
from edgekd.models import model_source_files
from edgekd.recipe import Recipe

MODEL_FILE = "teacher.pt"
ENTRY_FILE = "entry.json"
STORE_VERSION = 1  # bump when the entry layout changes


def store_dir(recipe: Recipe) -> Path:
    return recipe.runs_dir.parent / "cache" / "teachers"


def _code_files(model: nn.Module, model_name: str) -> list[Path]:
    """The files whose code built and trained the teacher."""
    model_file = inspect.getsourcefile(type(getattr(model, "net", model)))
    files = [Path(trainer.__file__), Path(supervised.__file__), *model_source_files(model_name)]
    return files + ([Path(model_file)] if model_file else [])


def store_key(recipe: Recipe, model: nn.Module, data_fingerprint: str) -> str:
    """The store key of the teacher ``recipe`` trains on the data with ``data_fingerprint``."""
    spec = recipe.teacher
    return sha256_json(
        {
            "version": STORE_VERSION,
            "model": spec.model,
            "kwargs": spec.kwargs,
            "pretrained": spec.pretrained,
            "train": spec.train.model_dump(mode="json"),
            "seed": recipe.seed,
            "data": data_fingerprint,
            "torch": torch.__version__.split("+")[0],
            "code": {path.name: sha256_file(path) for path in _code_files(model, spec.model)},
        }
    )[:24]


def find(root: Path, key: str) -> dict[str, Any] | None:
    """The intact entry ``key`` (its ``entry.json`` plus ``model_file``), or None."""
    entry_file, model_file = root / key / ENTRY_FILE, root / key / MODEL_FILE
    try:
        entry = json.loads(entry_file.read_text(encoding="utf-8"))
        if not isinstance(entry, dict) or entry.get("sha256") != sha256_file(model_file):
            return None
    except (OSError, ValueError):
        return None
    return {**entry, "model_file": model_file}


def publish(
    root: Path, key: str, checkpoint: Path, record: dict[str, Any], log: Callable[[str], None]
) -> None:
    """Copy the trained ``checkpoint`` into the store under ``key`` (the entry file is written last)."""
    try:
        data = checkpoint.read_bytes()
        atomic.write_bytes(root / key / MODEL_FILE, data)
        atomic.write_json(
            root / key / ENTRY_FILE,
            {
                **record,
                "key": key,
                "sha256": sha256_file(root / key / MODEL_FILE),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "pid": os.getpid(),
            },
        )
    except OSError as exc:  # a full or read-only store costs the reuse, never the run
        log(f"  teacher not kept in the store {root} ({exc.strerror or exc}); the run goes on")
        return
    log(f"  teacher kept in the store {root / key} for later runs with the same settings")
