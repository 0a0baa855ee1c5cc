"""Atomic file writes: write to a temporary file in the same directory, then rename.

A crash never leaves a half-written output behind; a finished stage's files are never lost. The
temporary file is named ``.<name>.<pid>.<random>.tmp`` after the process writing it, so a later run
can remove what a killed process left (:func:`remove_stale_temps`) without touching the temporary
files of a run still in progress on the same directory. A full disk or an unwritable directory is
an :class:`~edgekd.errors.OutputError` naming the path, never a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgekd.errors import OutputError

# Errors that mean "this disk cannot take the bytes", whatever the code writing them was doing.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")
_LEGACY_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")  # before the PID was in the name
_PROCESS_START = time.time()


def disk_error(path: str | os.PathLike[str], exc: OSError, verb: str = "write") -> OutputError:
    """The one-line error for an OSError while writing ``path``: what happened and what to do."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in DISK_FULL:
        todo = (
            "free space on that disk (or set runs_dir to another one) and rerun; finished stages are "
            "kept and a half-written file is never taken as finished"
        )
    else:
        todo = "fix its permissions or choose another directory (--set runs_dir=PATH), then rerun"
    return OutputError(f"cannot {verb} {path}: {reason}; {todo}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The temporary file is removed on any failure. A full disk while writing, or a directory that
    cannot be created or written, raises :class:`OutputError` naming ``path``.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=target.parent
        )
    except OSError as exc:
        raise disk_error(target, exc, "create") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        try:
            yield tmp
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise disk_error(target, exc) from None
            raise
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise disk_error(target, exc) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a PID we could have written: leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def is_stale_temp(path: Path, started: float = _PROCESS_START) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_path` that no live process is writing.

    Its name must follow the temporary naming, its creator (the PID in the name) must be gone, and
    it must not have been touched since this process started. Names from before the PID was in
    them count as stale when older than this process.
    """
    match = _TEMP_NAME.match(path.name)
    try:
        if not path.is_file() or path.stat().st_mtime >= started:
            return False
    except OSError:
        return False
    if match is not None:
        pid = int(match["pid"])
        return pid != os.getpid() and not _pid_alive(pid)
    return _LEGACY_TEMP_NAME.match(path.name) is not None


def remove_stale_temps(directory: Path, recursive: bool = False) -> list[Path]:
    """Remove the temporary files killed processes left in ``directory``; returns those removed."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    candidates = directory.rglob(f".*{TEMP_SUFFIX}") if recursive else directory.glob(f".*{TEMP_SUFFIX}")
    for path in candidates:
        if is_stale_temp(path):
            try:
                path.unlink()
            except OSError:
                continue  # another run removed it first, or it is not ours to remove
            removed.append(path)
    return removed


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_torch(path: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save(obj)`` atomically, with bytes that depend only on ``obj``.

    ``torch.save`` to a file names the archive's records after the file, so saving through a
    temporary name would give different bytes (and hashes) for the same weights every time;
    serialising to memory first keeps equal checkpoints byte-identical, which the teacher cache
    and stage fingerprints rely on.
    """
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    """Serialise numpy scalars/arrays and paths that reports commonly hold."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
