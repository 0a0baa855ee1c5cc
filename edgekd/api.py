"""The library entry points behind the CLI: ``compress`` runs the whole pipeline for one target."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekd.errors import RecipeError
from edgekd.pipeline import RunContext, run_stages
from edgekd.recipe import Recipe, load_recipe
from edgekd.stages import PIPELINE, STAGE_NAMES
from edgekd.targets import resolve_target


def preflight(recipe: Recipe) -> None:
    """Fail in seconds, before any training, on names that cannot resolve or a runtime that is missing."""
    from edgekd.backends import BACKENDS, get_backend
    from edgekd.distill.methods import METHODS, parse_options
    from edgekd.models import model_factory

    target = resolve_target(recipe.target)
    model_factory(recipe.teacher.model)
    model_factory(recipe.student.model)
    method = METHODS.get(recipe.distill.method)
    for name in recipe.distill.options:
        parse_options(METHODS.get(name), recipe.distill, name)
    if recipe.distill.label_fraction < 1 and not method.supports_missing_labels:
        semi = ", ".join(name for name in METHODS.names() if METHODS.get(name).supports_missing_labels)
        raise RecipeError(
            f"distill.label_fraction={recipe.distill.label_fraction}: method {recipe.distill.method!r} "
            f"needs every label; use one of {semi} or set distill.label_fraction: 1.0"
        )
    if BACKENDS.get(target.backend).builds_without_runtime:
        # Builds on the device: without the runtime here the compile stage still writes the bundle.
        from edgekd.stages.device_build import engine_options

        engine_options(recipe, target)
    else:
        get_backend(target.backend)  # a missing runtime stops the run now, with its install hint


def compress(
    recipe: Recipe | Path | str | None = None,
    overrides: list[str] | None = None,
    force: set[str] | None = None,
    until: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the pipeline (optionally only up to stage ``until``) and return the report, or the last results.

    ``recipe`` is a Recipe, a YAML path, or None for the built-in default radio recipe.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(Path(recipe) if recipe is not None else None, overrides or [])
    if until is not None and until not in STAGE_NAMES:
        raise RecipeError(f"--until {until!r}: no such stage; stages are {', '.join(STAGE_NAMES)}")
    stages = PIPELINE if until is None else PIPELINE[: STAGE_NAMES.index(until) + 1]
    preflight(recipe)
    ctx = RunContext(recipe=recipe, run_dir=recipe.run_dir, log=log)
    results = run_stages(ctx, stages, force=force)
    if "report" in results:
        return json.loads(
            (ctx.run_dir / results["report"].outputs["report_file"]).read_text(encoding="utf-8")
        )
    return {name: result.outputs for name, result in results.items()}


def finished_run(run_dir: Path, until: str) -> RunContext:
    """The context of a finished run: its recipe (from report.json) and its stages' records up to ``until``.

    Records are read as they are (no fingerprint check), so a command on a finished run never retrains.
    """
    from edgekd.pipeline import STAGE_FILE, StageResult, stage_dir_name
    from edgekd.recipe import build_recipe

    report_file = run_dir / "report.json"
    if not report_file.is_file():
        raise RecipeError(f"{run_dir} has no report.json; finish the run first with edgekd compress")
    recipe = build_recipe(json.loads(report_file.read_text(encoding="utf-8"))["recipe"], str(report_file))
    ctx = RunContext(recipe=recipe, run_dir=run_dir)
    for index, stage in enumerate(PIPELINE[: STAGE_NAMES.index(until)], start=1):
        record_file = run_dir / stage_dir_name(index, stage) / STAGE_FILE
        if not record_file.is_file():
            raise RecipeError(f"{run_dir}: stage {stage.name} has not finished ({record_file} is missing)")
        record = json.loads(record_file.read_text(encoding="utf-8"))
        ctx.results[stage.name] = StageResult(
            stage.name, record["outputs"], record["fingerprint"], record["wall_s"], True, record_file
        )
    return ctx


def bundle(run_dir: Path | str, target: str | None = None, precision: str | None = None) -> Path:
    """Write the bundle of a finished run (see :mod:`edgekd.bundle.build`); returns its directory."""
    from edgekd.bundle.build import write_bundle

    ctx = finished_run(Path(run_dir), "bundle")
    if target is not None and resolve_target(target).name != ctx.target.name:
        raise RecipeError(
            f"{run_dir} was compiled for target {ctx.target.name}, not {target}; "
            f"run edgekd compress --target {target} for that one"
        )
    if precision is not None and precision not in ("fp32", "fp16", "int8"):
        raise RecipeError(f"--artifact {precision!r}: expected fp32, fp16 or int8")
    return write_bundle(ctx, precision)


def search_student(
    recipe: Recipe,
    candidates: list[str],
    budget: Any = None,
    batch: int = 64,
    out: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """DisWOT student search (see :mod:`edgekd.distill.search`) for the recipe's teacher and data.

    The teacher comes from the recipe's teacher stage (its checkpoint, or trained on the labels as
    ``compress`` would); the ranking is written to ``out`` (default ``models/search/<run name>.json``).
    """
    from edgekd import atomic
    from edgekd.backends.base import resolve_threads
    from edgekd.data import build_dataset
    from edgekd.distill.search import LATENCY_PROTOCOL, Budget, check_candidates, rank_students
    from edgekd.models import build_model
    from edgekd.models.checkpoint import load_weights

    names = check_candidates(candidates)  # unknown names fail before any training
    budget = budget or Budget()
    teacher_outputs = compress(recipe, until="teacher", log=log)["teacher"]
    data = build_dataset(recipe.data, seed=recipe.seed)
    meta = data[2]
    shape = meta.input_shape
    teacher = build_model(
        recipe.teacher.model, len(meta.classes), shape[0], role="teacher", input_shape=shape
    )
    load_weights(teacher, recipe.run_dir / teacher_outputs["model_file"], recipe.teacher.model)
    ranked = rank_students(teacher, names, data, budget, batch=batch, seed=recipe.seed, log=log)
    out = out or Path("models/search") / f"{recipe.name}.json"
    result = {
        "method": "DisWOT (Dong, Li, Wei, CVPR 2023): semantic (Grad-CAM class Gram) + relation "
        "(sample Gram) distances to the teacher, students at random init; lower is better",
        "teacher": {
            "model": recipe.teacher.model,
            "origin": teacher_outputs["origin"],
            "val_accuracy": teacher_outputs["val_accuracy"],
            "checkpoint": str(recipe.run_dir / teacher_outputs["model_file"]),
        },
        "data": {"name": meta.name, "fingerprint": meta.fingerprint, "input_shape": list(meta.input_shape)},
        "batch": min(batch, len(data[0])),
        "seed": recipe.seed,
        "budget": {"max_flops": budget.max_flops, "max_latency_ms": budget.max_latency_ms},
        "latency_protocol": {**LATENCY_PROTOCOL, "threads": resolve_threads(budget.threads)},
        "candidates": [candidate.to_dict() for candidate in ranked],
        "out": str(out),
    }
    atomic.write_json(out, result)
    return result
