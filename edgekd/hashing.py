"""Content hashes used for stage fingerprints, dataset provenance and bundle checksums."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object with sorted keys (stable across runs)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_paths(paths: list[Path]) -> str:
    """Hash of several files' contents, in the given order."""
    return sha256_json([sha256_file(p) for p in paths])
