"""Stage 7: write ``report.json`` and ``report.md`` into the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd import atomic
from edgekd.pipeline import RunContext, Stage
from edgekd.recipe import Recipe
from edgekd.report.build import build_report
from edgekd.report.markdown import render_markdown


def _config(recipe: Recipe) -> dict[str, Any]:
    return {"recipe": recipe.model_dump(mode="json")}


def _inputs(ctx: RunContext) -> list[Path]:
    """Every earlier stage's record: any rerun upstream rewrites the report."""
    return [result.record_file for result in ctx.results.values()]


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    report = build_report(ctx)
    atomic.write_json(ctx.run_dir / "report.json", report)
    atomic.write_text(ctx.run_dir / "report.md", render_markdown(report))
    return {"report_file": "report.json", "markdown_file": "report.md", "headline": report["headline"]}


STAGE = Stage("report", _run, _config, _inputs)
