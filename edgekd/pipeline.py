"""Stage runner over a run directory: fingerprints, cache, forced reruns, resume.

Each stage writes into ``<run_dir>/<NN>-<stage>/`` and, when it finishes, a ``stage.json`` holding
its fingerprint (hash of its recipe slice and of its input files), its outputs and its wall time.
A stage whose fingerprint matches a finished ``stage.json`` (with every output file still present)
is skipped. A stage that crashed left no ``stage.json``; rerunning starts it again, and stages that
checkpoint (distillation) resume from their last checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from edgekd import atomic
from edgekd.errors import OutputError, RecipeError
from edgekd.hashing import sha256_file, sha256_json
from edgekd.recipe import Recipe
from edgekd.targets import Target, resolve_target

STAGE_FILE = "stage.json"


@dataclass
class StageResult:
    """What a finished stage hands to later stages and to the report."""

    name: str
    outputs: dict[str, Any]
    fingerprint: str
    wall_s: float
    cached: bool
    record_file: Path


@dataclass
class RunContext:
    """Everything a stage needs: the recipe, the run directory and earlier stages' results."""

    recipe: Recipe
    run_dir: Path
    log: Callable[[str], None] = print
    results: dict[str, StageResult] = field(default_factory=dict)

    @cached_property
    def target(self) -> Target:
        return resolve_target(self.recipe.target)

    @cached_property
    def dataset(self) -> tuple[Any, Any, Any]:
        """(train, val, meta), built once per process and shared by every stage."""
        from edgekd.data import build_dataset

        return build_dataset(self.recipe.data, seed=self.recipe.seed)

    def output(self, stage: str, key: str) -> Any:
        return self.results[stage].outputs[key]

    def path(self, stage: str, key: str) -> Path:
        return self.run_dir / self.results[stage].outputs[key]


@dataclass(frozen=True)
class Stage:
    """A pipeline step. ``config`` picks its recipe slice; ``inputs`` names files it reads."""

    name: str
    run: Callable[[RunContext, Path], dict[str, Any]]
    config: Callable[[Recipe], dict[str, Any]]
    inputs: Callable[[RunContext], list[Path]] = lambda ctx: []


def recipe_fields(*names: str) -> Callable[[Recipe], dict[str, Any]]:
    """A stage's config slice: the named top-level recipe fields, as JSON values."""
    return lambda recipe: recipe.model_dump(mode="json", include=set(names))


def fingerprint(stage: Stage, ctx: RunContext) -> str:
    """Hash of the stage's recipe slice and the content of its input files."""
    inputs = {
        str(p.relative_to(ctx.run_dir) if p.is_relative_to(ctx.run_dir) else p): sha256_file(p)
        for p in stage.inputs(ctx)
    }
    return sha256_json({"stage": stage.name, "config": stage.config(ctx.recipe), "inputs": inputs})


def _output_files(outputs: dict[str, Any]) -> list[str]:
    """Files a stage produced: values of keys ending in ``_file`` and items of keys ending in ``_files``."""
    files = [value for key, value in outputs.items() if key.endswith("_file") and isinstance(value, str)]
    for key, value in outputs.items():
        if key.endswith("_files") and isinstance(value, list):
            files += [item for item in value if isinstance(item, str)]
    return files


def _cached(record_path: Path, run_dir: Path, expected: str) -> dict[str, Any] | None:
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != expected:
        return None
    if not all((run_dir / name).is_file() for name in _output_files(record.get("outputs", {}))):
        return None
    return record


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run directory, or fail with one line if it cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"cannot write the run directory {run_dir}: {exc.strerror or exc}; "
            "choose another with --set runs_dir=PATH or fix its permissions"
        ) from None


def stage_dir_name(index: int, stage: Stage) -> str:
    return f"{index:02d}-{stage.name}"


def run_stages(ctx: RunContext, stages: list[Stage], force: set[str] | None = None) -> dict[str, StageResult]:
    """Run ``stages`` in order, skipping those whose fingerprint matches a finished record."""
    force = force or set()
    unknown = force - {s.name for s in stages} - {"all"}
    if unknown:
        known = ", ".join(s.name for s in stages)
        raise RecipeError(f"--force {', '.join(sorted(unknown))}: no such stage; stages are {known}")
    prepare_run_dir(ctx.run_dir)
    for index, stage in enumerate(stages, start=1):
        stage_dir = ctx.run_dir / stage_dir_name(index, stage)
        record_file = stage_dir / STAGE_FILE
        expected = fingerprint(stage, ctx)
        record = (
            None if (stage.name in force or "all" in force) else _cached(record_file, ctx.run_dir, expected)
        )
        if record is not None:
            ctx.results[stage.name] = StageResult(
                stage.name, record["outputs"], expected, record["wall_s"], True, record_file
            )
            ctx.log(f"[{stage.name}] cached ({record['wall_s']:.1f} s when run)")
            continue
        stage_dir.mkdir(parents=True, exist_ok=True)
        record_file.unlink(missing_ok=True)
        ctx.log(f"[{stage.name}] running")
        start = time.perf_counter()
        outputs = stage.run(ctx, stage_dir)
        wall_s = time.perf_counter() - start
        atomic.write_json(
            record_file,
            {
                "stage": stage.name,
                "fingerprint": expected,
                "config": stage.config(ctx.recipe),
                "outputs": outputs,
                "wall_s": round(wall_s, 3),
                "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "pid": os.getpid(),
            },
        )
        ctx.results[stage.name] = StageResult(stage.name, outputs, expected, wall_s, False, record_file)
        ctx.log(f"[{stage.name}] done in {wall_s:.1f} s")
    return ctx.results
