"""The ``edgekd`` command: parses, calls the library, prints rich tables. Errors: one line, exit 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import BaseModel
from rich.table import Table

from edgekd.console import console, log
from edgekd.errors import EdgekdError
from edgekd.recipe import Recipe, load_recipe

EXIT_USER_ERROR = 2


def _recipe_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every settable recipe field as 'dotted.name (default): description', for --help."""
    lines = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines += _recipe_fields(annotation, f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        text = f"{prefix}{name} (default {default!s})"
        lines.append(f"{text}: {field.description}" if field.description else text)
    return lines


COMPRESS_EPILOG = (
    "Every recipe field can be set with --set FIELD=VALUE (repeatable). Fields:\n\n"
    + "\n\n".join(_recipe_fields(Recipe))
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Distil, export, quantise, compile, profile and report a model for an edge target.",
)


def _overrides(flags: dict[str, Any], sets: list[str]) -> list[str]:
    """CLI flags as dotted overrides (flags first, so an explicit --set wins)."""
    mapped = [f"{field}={value}" for field, value in flags.items() if value is not None]
    return mapped + sets


@app.command(epilog=COMPRESS_EPILOG)
def compress(
    recipe: Annotated[
        Path | None, typer.Option(help="YAML recipe (default: recipes/radio-default.yaml)")
    ] = None,
    target: Annotated[str | None, typer.Option(help="target name or alias (see `edgekd targets`)")] = None,
    name: Annotated[str | None, typer.Option(help="run name: outputs go to <runs_dir>/<name>")] = None,
    data: Annotated[str | None, typer.Option(help="dataset: radio-synthetic, rml2016, rml2018")] = None,
    data_path: Annotated[Path | None, typer.Option(help="dataset file for rml2016/rml2018")] = None,
    teacher: Annotated[str | None, typer.Option(help="teacher model, e.g. edgekd:clst")] = None,
    teacher_checkpoint: Annotated[
        Path | None, typer.Option(help="trained teacher weights (skip training)")
    ] = None,
    student: Annotated[str | None, typer.Option(help="student model, e.g. edgekd:kd-cnn")] = None,
    method: Annotated[str | None, typer.Option(help="distillation method: none, kd, skd")] = None,
    epochs: Annotated[
        int | None, typer.Option(help="epochs for both teacher training and distillation")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed of every random source")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="FIELD=VALUE recipe override (repeatable)")
    ] = None,
    force: Annotated[
        list[str] | None, typer.Option(help="rerun this stage even if cached ('all' for every one)")
    ] = None,
    until: Annotated[str | None, typer.Option(help="stop after this stage")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the resolved recipe and exit")] = False,
) -> None:
    """Run the whole pipeline for one target: distil, export, quantise, compile, profile, report."""
    flags = {
        "target": target,
        "name": name,
        "data.name": data,
        "data.path": data_path,
        "teacher.model": teacher,
        "teacher.checkpoint": teacher_checkpoint,
        "student.model": student,
        "distill.method": method,
        "teacher.train.epochs": epochs,
        "distill.train.epochs": epochs,
        "seed": seed,
    }
    resolved = load_recipe(recipe, _overrides(flags, set_ or []))
    if dry_run:
        console.print(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False), end="")
        return
    from edgekd.api import compress as run_compress
    from edgekd.report.markdown import SUMMARY_HEADER, summary_rows

    report = run_compress(resolved, force=set(force or []), until=until, log=log)
    if "rows" not in report:
        console.print(f"stopped after stage {until!r}; outputs in {resolved.run_dir}")
        return
    table = Table(title=f"edgekd · {report['run']} · target {report['target']['name']}")
    for column in SUMMARY_HEADER:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in summary_rows(report):
        table.add_row(*row)
    console.print(table)
    console.print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in report["headline"].items()))
    console.print(f"report: {resolved.run_dir / 'report.md'}  {resolved.run_dir / 'report.json'}")


@app.command()
def targets() -> None:
    """List the deployment targets and whether each can run on this host (and why not)."""
    from edgekd.backends import BACKENDS
    from edgekd.targets import load_targets

    table = Table(title="edgekd targets")
    for column in ("target", "aliases", "backend", "precisions", "arch", "available here"):
        table.add_column(column)
    for target in load_targets().values():
        ok, why = (
            BACKENDS.get(target.backend)().available()
            if target.backend in BACKENDS
            else (False, "no backend")
        )
        if ok and not target.matches_host():
            ok, why = False, f"host is not {target.arch}"
        table.add_row(
            target.name,
            ", ".join(target.aliases),
            target.backend,
            ", ".join(target.precisions),
            target.arch,
            "yes" if ok else f"no: {why}",
        )
    console.print(table)


@app.command()
def methods() -> None:
    """List the distillation methods: paper, options with their defaults, and what each needs."""
    from edgekd.distill.methods import METHODS

    table = Table(
        title="edgekd distillation methods (recipe: distill.method, distill.options.<method>.<option>)"
    )
    for column in ("method", "paper / loss", "options (default)", "needs"):
        table.add_column(column, overflow="fold")
    for name in METHODS.names():
        method = METHODS.get(name)
        options = ", ".join(f"{key}={info.default!r}" for key, info in method.Options.model_fields.items())
        needs = [
            label
            for label, flag in (
                ("teacher", method.needs_teacher),
                ("feature maps (live teacher)", method.needs_feature_maps),
                ("mixes inputs (live teacher)", method.mixes_inputs),
                ("held-out slice", method.held_out_fraction > 0),
                ("works with missing labels", method.supports_missing_labels),
            )
            if flag
        ]
        summary = " ".join((method.__doc__ or "").strip().split("\n\n")[0].split())
        table.add_row(name, summary, options or "-", ", ".join(needs) or "labels only")
    console.print(table)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except EdgekdError as exc:
        print(f"edgekd: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
