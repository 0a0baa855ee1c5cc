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
    from edgekd.backends import get_backend
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
    get_backend(target.backend)


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
