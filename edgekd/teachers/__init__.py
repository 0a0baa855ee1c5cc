"""The trained teachers edgekd ships: ``NAME.safetensors`` (weights) beside ``NAME.json`` (how it was
trained: its ``model`` and ``data``, written by ``benchmarks/default_teacher.py``).

A recipe names one as ``teacher.checkpoint: builtin:NAME``. A shipped teacher fits only the task it
was trained for, its JSON's ``model`` (``teacher.model``) and ``data.name``; :func:`task_of` reads
that pair, and both the recipe's default (:class:`edgekd.recipe.Recipe` drops the default checkpoint
for another task) and the preflight (an explicit ``builtin:`` teacher for another task is one line,
:func:`edgekd.api.check_builtin_teacher`) read it from here. Shipping a second teacher is adding its
two files.

This module imports only the standard library: the recipe's validators call it.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent
PREFIX = "builtin:"
WEIGHTS_SUFFIX = ".safetensors"


def names() -> list[str]:
    """The shipped teachers' names (``builtin:NAME``), sorted."""
    return sorted(path.stem for path in SHIPPED_DIR.glob(f"*{WEIGHTS_SUFFIX}"))


def weights(name: str) -> Path:
    return SHIPPED_DIR / f"{name}{WEIGHTS_SUFFIX}"


def resolve(checkpoint: str) -> Path:
    """``builtin:NAME`` as the shipped teacher's weights file, any other string as a path; ValueError
    naming the shipped teachers for an unknown NAME."""
    if not checkpoint.startswith(PREFIX):
        return Path(checkpoint)
    name = checkpoint.removeprefix(PREFIX)
    if name not in names():
        raise ValueError(f"no shipped teacher {name!r}; shipped: {', '.join(names()) or 'none'}")
    return weights(name)


def shipped_name(checkpoint: str | Path | None) -> str | None:
    """The name of the shipped teacher whose weights ``checkpoint`` is, else None."""
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    return path.stem if path.parent == SHIPPED_DIR and path.suffix == WEIGHTS_SUFFIX else None


@cache
def task_of(name: str) -> dict[str, str]:
    """The task the shipped teacher ``name`` was trained for, read from its JSON, keyed by the recipe
    fields that must match: ``{"teacher.model": ..., "data.name": ...}``."""
    trained = json.loads((SHIPPED_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return {"teacher.model": trained["model"], "data.name": trained["data"]["name"]}


def mismatch(name: str, teacher_model: str, data_name: str) -> tuple[str, str, str] | None:
    """The first recipe field on which the task differs from the shipped teacher ``name``'s, as
    (field, the teacher's value, the recipe's value); None when the teacher fits."""
    have = {"teacher.model": teacher_model, "data.name": data_name}
    for field, value in task_of(name).items():
        if have[field] != value:
            return field, value, have[field]
    return None


def shipped_for(teacher_model: str, data_name: str) -> str | None:
    """The name of the first shipped teacher trained for ``teacher_model`` on ``data_name``, else None."""
    return next((name for name in names() if mismatch(name, teacher_model, data_name) is None), None)
