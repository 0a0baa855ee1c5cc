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


def sha256_state(obj: Any) -> str:
    """Hash of a nested checkpoint state (dicts, lists, tensors or arrays, numbers, strings).

    Tensors and arrays contribute their dtype, shape and raw bytes; containers their keys and
    order. A checkpoint stores this hash of its own content, so a byte changed on disk (which
    ``torch.load`` does not notice: it checks no CRC) is caught when the checkpoint is read back.
    """
    digest = hashlib.sha256()
    _feed_state(digest, obj)
    return digest.hexdigest()


def _feed_state(digest: Any, obj: Any) -> None:
    if isinstance(obj, dict):
        digest.update(b"{%d" % len(obj))
        for key, value in obj.items():
            digest.update(f"{type(key).__name__}:{key!r}=".encode())
            _feed_state(digest, value)
        digest.update(b"}")
    elif isinstance(obj, list | tuple):
        digest.update(b"[%d" % len(obj))
        for item in obj:
            _feed_state(digest, item)
        digest.update(b"]")
    elif hasattr(obj, "detach") and hasattr(obj, "dtype"):  # a torch tensor: torch is loaded already
        import torch

        flat = obj.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor:{obj.dtype}:{tuple(obj.shape)}:".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    elif hasattr(obj, "tobytes") and hasattr(obj, "dtype") and hasattr(obj, "shape"):  # numpy
        digest.update(f"array:{obj.dtype}:{tuple(obj.shape)}:".encode())
        digest.update(obj.tobytes())
    else:
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())
