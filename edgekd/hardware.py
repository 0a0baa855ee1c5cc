"""Hardware selection: the same student (and teacher) compiled, profiled and compared on several targets.

``benchmark`` runs ``compress`` once per target, as run ``<name>-<target>``. The teacher, distill and
export stages do not depend on the target (their fingerprints hold no target field), so after the
first target's run their directories are copied into every later run: the pipeline's fingerprint
check then finds them cached, and every target compiles the byte-identical student ONNX. A target
whose runtime is missing here is still listed, with the reason. The comparison (``report.json``,
``report.md``, ``report.html``, ``pareto.svg``) is written to ``out``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekd import atomic
from edgekd.errors import BackendUnavailable, RecipeError
from edgekd.pipeline import stage_dir_name
from edgekd.recipe import load_recipe
from edgekd.targets import Target, resolve_target

SHARED_STAGES = ("teacher", "distill", "export")


def parse_targets(text: str | list[str]) -> list[Target]:
    """``"x86-ort,x86-openvino"`` (or a list) as targets, aliases resolved, each once, in the given order."""
    names = [part.strip() for item in ([text] if isinstance(text, str) else text) for part in item.split(",")]
    names = [name for name in names if name]
    if not names:
        raise RecipeError("--targets is empty; name one or more targets, e.g. --targets x86-ort,x86-openvino")
    targets: dict[str, Target] = {}
    for name in names:
        target = resolve_target(name)
        targets.setdefault(target.name, target)
    return list(targets.values())


def share_stages(source_run: Path, run_dir: Path) -> list[str]:
    """Copy the target-independent stage directories of ``source_run`` into ``run_dir`` (each replaced
    whole: a copy beside it, then renamed into place); returns the stage directory names copied."""
    from edgekd.stages import PIPELINE

    copied = []
    for index, stage in enumerate(PIPELINE, start=1):
        if stage.name not in SHARED_STAGES:
            continue
        name = stage_dir_name(index, stage)
        source, target = source_run / name, run_dir / name
        staged, old = run_dir / f".{name}.incoming", run_dir / f".{name}.old"
        for leftover in (staged, old):
            shutil.rmtree(leftover, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, staged)
        if target.exists():
            target.rename(old)
        staged.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        copied.append(name)
    return copied


def benchmark(
    targets: str | list[str],
    recipe: Path | str | None = None,
    overrides: list[str] | None = None,
    out: Path | str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compress the recipe's student for every target and write the comparison into ``out``.

    ``out`` defaults to ``<runs_dir>/<name>-benchmark``. Returns the comparison report (report.json).
    """
    from edgekd.api import check_names, compress
    from edgekd.report.hardware import build_comparison, pareto_plot, render_html, render_markdown

    overrides = list(overrides or [])
    recipe_path = Path(recipe) if recipe is not None else None
    base = load_recipe(recipe_path, overrides)
    chosen = parse_targets(targets)
    out_dir = Path(out) if out is not None else base.runs_dir / f"{base.name}-benchmark"
    entries: list[dict[str, Any]] = []
    first_run: Path | None = None
    for target in chosen:
        run_recipe = load_recipe(
            recipe_path, [*overrides, f"target={target.name}", f"name={base.name}-{target.name}"]
        )
        entry: dict[str, Any] = {"target": target, "run_dir": run_recipe.run_dir, "report": None, "why": None}
        entries.append(entry)
        log(f"== target {target.name}: run {run_recipe.run_dir}")
        try:
            check_names(run_recipe)  # compress checks the rest before it trains
        except BackendUnavailable as exc:
            entry["why"] = str(exc)
            log(f"  not run: {exc}")
            continue
        if first_run is not None:
            copied = share_stages(first_run, run_recipe.run_dir)
            log(f"  shared with {first_run.name}: {', '.join(copied)}")
        entry["report"] = compress(run_recipe, log=log)
        first_run = first_run or run_recipe.run_dir
    comparison = {**build_comparison(base.name, entries), "out": str(out_dir)}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out_dir / "report.json", comparison)
    atomic.write_text(out_dir / "report.md", render_markdown(comparison))
    atomic.write_text(out_dir / "report.html", render_html(comparison))
    atomic.write_text(out_dir / "pareto.svg", pareto_plot(comparison))
    return comparison
