"""Stage runner over a run directory: fingerprints, cache, forced reruns, resume, integrity.

Each stage writes into ``<run_dir>/<NN>-<stage>/`` and, when it finishes, a ``stage.json`` holding
its fingerprint (hash of its recipe slice and of its input files), its outputs, the SHA-256 of every
output file and its wall time. A stage whose fingerprint matches a finished ``stage.json`` is
skipped only when every output file is still there with the recorded hash; a file changed since
(truncated, a byte flipped) reruns the stage, saying so. A ``stage.json`` that cannot be read or has
the wrong shape means "not finished". A stage that crashed left no ``stage.json``; rerunning starts
it again, and stages that checkpoint (teacher, distillation) resume from their last checkpoint;
``--force STAGE`` removes the stage's folder (checkpoints included) first, so it starts afresh.
Temporary files a killed run left behind are removed when the next run starts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property, partial
from pathlib import Path
from typing import Any

from edgekd import atomic, distributed
from edgekd.errors import RecipeError
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
    forced: set[str] = field(default_factory=set)  # stages run with --force (start afresh, reuse nothing)

    @property
    def task(self) -> str:
        """The run's task kind (:data:`edgekd.tasks.TASKS`), from the dataset source the recipe names."""
        from edgekd.tasks import task_of

        return task_of(self.recipe.data.name)

    @cached_property
    def target(self) -> Target:
        return resolve_target(self.recipe.target)

    @cached_property
    def dataset(self) -> tuple[Any, Any, Any]:
        """(train, val, meta), built once per process and shared by every stage."""
        from edgekd.data import build_dataset

        recipe = self.recipe  # built-in detection scenes are written under <runs_dir>/../data
        return build_dataset(recipe.data, seed=recipe.seed, data_dir=recipe.runs_dir.parent / "data")

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


# data fields that change how the data is read, not what is read: left out of every stage's key
READING_ONLY = ("stream", "workers")


def fingerprint(stage: Stage, ctx: RunContext) -> str:
    """Hash of the stage's recipe slice and the content of its input files.

    A stage whose slice holds the ``data`` section is also keyed by the dataset's own fingerprint
    (it hashes the data files' content), so replacing a data file at the same path reruns it.
    """
    inputs = {
        str(p.relative_to(ctx.run_dir) if p.is_relative_to(ctx.run_dir) else p): sha256_file(p)
        for p in stage.inputs(ctx)
    }
    config = stage.config(ctx.recipe)
    if "data" in config:  # how the data is read (streamed, by how many workers) gives the same batches
        config = {**config, "data": {k: v for k, v in config["data"].items() if k not in READING_ONLY}}
    if "distill" in config:  # the training device: keyed as "device: cuda" by the stages that train on it
        config = {**config, "distill": {k: v for k, v in config["distill"].items() if k != "accelerator"}}
    data = {"data_fingerprint": ctx.dataset[2].fingerprint} if "data" in config else {}
    return sha256_json({"stage": stage.name, "config": config, "inputs": inputs, **data})


def _output_files(outputs: dict[str, Any]) -> list[str]:
    """Files a stage produced: values of keys ending in ``_file`` and items of keys ending in ``_files``."""
    files = [value for key, value in outputs.items() if key.endswith("_file") and isinstance(value, str)]
    for key, value in outputs.items():
        if key.endswith("_files") and isinstance(value, list):
            files += [item for item in value if isinstance(item, str)]
    return files


def output_hashes(outputs: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """SHA-256 of each output file (paths relative to ``run_dir``) that exists."""
    names = _output_files(outputs)
    return {name: sha256_file(run_dir / name) for name in names if (run_dir / name).is_file()}


def read_record(record_file: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A ``stage.json`` as a dict, or None and why it cannot be used (None as well when it is absent).

    Invalid UTF-8, invalid JSON, a value that is not an object, or fields of the wrong type make a
    record unusable: the stage counts as not finished.
    """
    if not record_file.is_file():
        return None, None
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return None, "is not valid UTF-8"
    except json.JSONDecodeError as exc:
        return None, f"is not valid JSON ({exc.msg} at line {exc.lineno})"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    if not isinstance(record, dict):
        return None, f"holds a JSON {type(record).__name__}, not an object"
    expected = {"fingerprint": str, "outputs": dict, "wall_s": (int, float), "files": dict}
    for key, kind in expected.items():
        value = record.get(key)
        if key == "files" and value is None:
            return None, "records no file hashes (written by an older edgekd)"
        if not isinstance(value, kind) or isinstance(value, bool):
            return None, f"has no valid {key!r} field"
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in record["files"].items()):
        return None, "has no valid 'files' field"
    return record, None


def _shown(name: str, stage_dir: Path, run_dir: Path) -> str:
    path = run_dir / name
    return str(path.relative_to(stage_dir)) if path.is_relative_to(stage_dir) else name


def verify_outputs(record: dict[str, Any], run_dir: Path, stage_dir: Path) -> str | None:
    """Why the record's output files cannot be reused (missing, or changed since written), else None."""
    hashes = record["files"]
    for name in _output_files(record["outputs"]):
        shown = _shown(name, stage_dir, run_dir)
        if not (run_dir / name).is_file():
            return f"{shown} is missing"
        if name not in hashes:
            return f"{shown} has no recorded sha256"
        try:
            actual = sha256_file(run_dir / name)
        except OSError as exc:
            return f"{shown} cannot be read ({exc.strerror or exc})"
        if actual != hashes[name]:
            return f"{shown} changed since it was written (sha256 mismatch)"
    return None


def _cached(record_path: Path, run_dir: Path, expected: str) -> tuple[dict[str, Any] | None, str | None]:
    """The finished record if it can be reused, else None and (when worth saying) why not."""
    record, why = read_record(record_path)
    if record is None:
        return None, None if why is None else f"{record_path.relative_to(run_dir)} {why}"
    if record["fingerprint"] != expected:
        return None, None  # the recipe slice or an input changed: an ordinary rerun
    why = verify_outputs(record, run_dir, record_path.parent)
    return (record, None) if why is None else (None, why)


def clear_stage(stage_dir: Path) -> bool:
    """Remove a stage's folder (outputs, record and checkpoints) so it starts afresh; True if any."""
    if not stage_dir.exists():
        return False
    had_files = any(stage_dir.iterdir()) if stage_dir.is_dir() else True
    try:
        shutil.rmtree(stage_dir) if stage_dir.is_dir() else stage_dir.unlink()
    except OSError as exc:
        raise atomic.disk_error(stage_dir, exc, "remove") from None
    return had_files


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run directory, or fail with one line if it cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"  # per process: ranks of one run probe at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise atomic.disk_error(f"the run directory {run_dir}", exc) from None


def stage_dir_name(index: int, stage: Stage) -> str:
    return f"{index:02d}-{stage.name}"


def run_stages(ctx: RunContext, stages: list[Stage], force: set[str] | None = None) -> dict[str, StageResult]:
    """Run ``stages`` in order, skipping those whose fingerprint matches a finished, intact record.

    A forced stage (``force`` holds its name, or ``"all"``) starts afresh: its folder, checkpoints
    included, is removed first.
    """
    force = force or set()
    ctx.forced = {stage.name for stage in stages} if "all" in force else set(force)
    unknown = force - {s.name for s in stages} - {"all"}
    if unknown:
        known = ", ".join(s.name for s in stages)
        raise RecipeError(f"--force {', '.join(sorted(unknown))}: no such stage; stages are {known}")
    # Several processes (distill.world_size): teacher and distill run under torch.distributed first.
    stages, force = distributed.run_training_stages(ctx, stages, force)
    ctx.forced = {stage.name for stage in stages} if "all" in force else set(force)
    if distributed.is_main():  # under torch.distributed, rank 0 alone writes
        prepare_run_dir(ctx.run_dir)
        removed = atomic.remove_stale_temps(ctx.run_dir, recursive=True)
        if removed:
            ctx.log(f"removed {len(removed)} temporary file(s) a killed run left in {ctx.run_dir}")
    distributed.barrier()
    for index, stage in enumerate(stages, start=1):
        stage_dir = ctx.run_dir / stage_dir_name(index, stage)
        record_file = stage_dir / STAGE_FILE
        expected = fingerprint(stage, ctx)
        forced = stage.name in force or "all" in force
        record, why = (
            (None, None)
            if forced
            else distributed.decide(partial(_cached, record_file, ctx.run_dir, expected))
        )
        if record is not None:
            ctx.results[stage.name] = StageResult(
                stage.name, record["outputs"], expected, record["wall_s"], True, record_file
            )
            ctx.log(f"[{stage.name}] cached ({record['wall_s']:.1f} s when run)")
            continue
        if why is not None:
            ctx.log(f"[{stage.name}] {why}; rerunning")
        if distributed.is_main():
            if forced and clear_stage(stage_dir):
                ctx.log(f"[{stage.name}] --force: removed {stage_dir.name}/ (outputs and checkpoints)")
            try:
                stage_dir.mkdir(parents=True, exist_ok=True)
                record_file.unlink(missing_ok=True)
            except OSError as exc:
                raise atomic.disk_error(stage_dir, exc, "create") from None
        distributed.barrier()
        ctx.log(f"[{stage.name}] running")
        start = time.perf_counter()
        try:
            outputs = stage.run(ctx, stage_dir)
        except OSError as exc:
            if exc.errno in atomic.DISK_FULL:
                raise atomic.disk_error(exc.filename or stage_dir, exc) from None
            raise
        wall_s = time.perf_counter() - start
        distributed.barrier()  # every rank finished the stage before rank 0 records it
        if distributed.is_main():
            atomic.write_json(
                record_file,
                {
                    "stage": stage.name,
                    "fingerprint": expected,
                    "config": stage.config(ctx.recipe),
                    "outputs": outputs,
                    "files": output_hashes(outputs, ctx.run_dir),
                    "wall_s": round(wall_s, 3),
                    "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "pid": os.getpid(),
                },
            )
        ctx.results[stage.name] = StageResult(stage.name, outputs, expected, wall_s, False, record_file)
        ctx.log(f"[{stage.name}] done in {wall_s:.1f} s")
    return ctx.results
