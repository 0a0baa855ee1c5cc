"""The ``edgekd`` command: parses, calls the library, prints rich tables. Errors: one line, exit 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import click
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


# Options compress and deploy share.
SetFlag = Annotated[list[str] | None, typer.Option("--set", help="FIELD=VALUE recipe override (repeatable)")]
ForceFlag = Annotated[
    list[str] | None, typer.Option(help="rerun this stage even if cached ('all' for every one)")
]
UntilFlag = Annotated[str | None, typer.Option(help="stop after this stage")]
DeviceFlag = Annotated[
    str | None, typer.Option(help="also profile on this device over SSH: user@host[:port]")
]
KnownHostsFlag = Annotated[
    Path | None, typer.Option(help="known_hosts file the device's host key is checked against")
]


def run_name_for(data: str) -> str:
    """A run name for ``--data``: the dataset's name, or for ``npz:FILE`` the file's stem."""
    kind, _, path = data.partition(":")
    return Path(path).stem or kind if path else data


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
    name: Annotated[
        str | None,
        typer.Option(
            help="run name: outputs go to <runs_dir>/<name> (default: the recipe's, or --data's value)"
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="dataset: radio-synthetic, rml2016, rml2018, digits, imagefolder, npz:FILE; detection: "
            "scenes (built in), coco, yolo"
        ),
    ] = None,
    data_path: Annotated[
        Path | None,
        typer.Option(
            help="dataset file (rml2016/rml2018, coco: annotations .json) or directory (imagefolder, yolo)"
        ),
    ] = None,
    teacher: Annotated[
        str | None, typer.Option(help="teacher model, e.g. edgekd:clst or timm:resnet18")
    ] = None,
    teacher_checkpoint: Annotated[
        Path | None, typer.Option(help="trained teacher weights (skip training)")
    ] = None,
    student: Annotated[
        str | None, typer.Option(help="student model, e.g. edgekd:kd-cnn or timm:mobilenetv3_small_100")
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="distillation method (`edgekd methods` lists them all)")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="epochs for both teacher training and distillation")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed of every random source")] = None,
    set_: SetFlag = None,
    force: ForceFlag = None,
    until: UntilFlag = None,
    device: DeviceFlag = None,
    known_hosts: KnownHostsFlag = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the resolved recipe and exit")] = False,
    nproc: Annotated[
        int | None,
        typer.Option(
            min=1, help="processes per node that train the teacher and student (torch.distributed, DDP)"
        ),
    ] = None,
    nnodes: Annotated[int, typer.Option(min=1, help="nodes taking part (torchrun --nnodes)")] = 1,
    node_rank: Annotated[
        int | None, typer.Option(min=0, help="this node's rank (torchrun --node-rank)")
    ] = None,
    rdzv_endpoint: Annotated[
        str | None, typer.Option(help="HOST:PORT every node reaches (torchrun --rdzv-endpoint)")
    ] = None,
) -> None:
    """Run the whole pipeline for one target: distil, export, quantise, compile, profile, bundle, report."""
    if name is None and data is not None and recipe is None:
        name = run_name_for(data)  # another dataset gets its own run directory, not the default recipe's
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
        "device.host": device,
        "device.known_hosts": known_hosts,
        "distill.world_size": nproc * nnodes if nproc is not None else None,
    }
    resolved = load_recipe(recipe, _overrides(flags, set_ or []))
    if dry_run:
        console.print(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False), end="")
        return
    from edgekd import distributed
    from edgekd.api import compress as run_compress

    distributed.set_launch_options(nnodes, node_rank, rdzv_endpoint)
    report = run_compress(resolved, force=set(force or []), until=until, log=log)
    if not distributed.secondary_rank():  # torchrun's other ranks leave the summary to rank 0
        _print_report(report, until, resolved.run_dir)


@app.command(epilog=COMPRESS_EPILOG)
def deploy(
    model: Annotated[
        str,
        typer.Argument(
            help="the model: an .onnx file (or onnx:FILE), or a model source (edgekd:, timm:, torchvision:, "
            "py:FILE.py:FACTORY, package.module:FACTORY) with --checkpoint"
        ),
    ],
    target: Annotated[str, typer.Option(help="target name or alias (see `edgekd targets`)")],
    data: Annotated[
        str,
        typer.Option(help="dataset for calibration and evaluation: npz:FILE, digits, radio-synthetic, ..."),
    ],
    checkpoint: Annotated[
        Path | None, typer.Option(help="weights of a PyTorch model source (.pt state_dict, .safetensors)")
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option(help="YAML recipe (quantize, profile, bundle settings)")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="run name: outputs go to <runs_dir>/<name> (default: the model's stem)")
    ] = None,
    set_: SetFlag = None,
    force: ForceFlag = None,
    until: UntilFlag = None,
    device: DeviceFlag = None,
    known_hosts: KnownHostsFlag = None,
) -> None:
    """Deploy a model trained elsewhere (no distillation): quantise, compile, profile, bundle, report."""
    from edgekd.api import deploy as run_deploy

    flags = {"name": name, "device.host": device, "device.known_hosts": known_hosts}
    report = run_deploy(
        model,
        target=target,
        data=data,
        checkpoint=checkpoint,
        recipe=recipe,
        overrides=_overrides(flags, set_ or []),
        force=set(force or []),
        until=until,
        log=log,
    )
    _print_report(report, until, None)


def _print_report(report: dict[str, Any], until: str | None, run_dir: Path | None) -> None:
    """The summary table, headline and report paths of a finished run (or where it stopped)."""
    from edgekd.report.markdown import summary_header, summary_rows

    if "rows" not in report:
        console.print(f"stopped after stage {until!r}" + (f"; outputs in {run_dir}" if run_dir else ""))
        return
    run_dir = run_dir or Path(report["recipe"]["runs_dir"]) / report["run"]
    table = Table(title=f"edgekd · {report['run']} · target {report['target']['name']}")
    for column in summary_header(report):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in summary_rows(report):
        table.add_row(*row)
    console.print(table)
    console.print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in report["headline"].items()))
    if report.get("labels_note"):
        console.print(report["labels_note"])
    for item in report.get("not_measured", []):
        console.print(f"not measured: {item['name']}: {item['why']}")
    console.print(f"report: {run_dir / 'report.md'}  {run_dir / 'report.json'}")


def _hardware(target: Any) -> str:
    """One short line: GPU/DLA or CPU, memory and dense peak INT8 throughput where known."""
    from edgekd.report.hardware import hardware_line

    return hardware_line(target.to_dict())


@app.command()
def targets() -> None:
    """List the deployment targets, their hardware, and whether each runs on this host (and why not)."""
    from edgekd.backends import BACKENDS
    from edgekd.targets import load_targets

    table = Table(title="edgekd targets")
    for column in ("target", "aliases", "backend", "precisions", "arch", "hardware", "available here"):
        table.add_column(column)
    reasons = []
    for target in load_targets().values():
        problems = target.host_problems()
        backend = BACKENDS.get(target.backend)
        if not problems:
            status = "yes"
        elif backend().available()[0]:
            status = "runs, but on this host's arch"
        elif backend.builds_without_runtime:
            status = "no: bundle + build script only"
        else:
            status = "no"
        if problems:
            reasons.append(f"{target.name}: " + "; ".join(problems))
        table.add_row(
            target.name,
            ", ".join(target.aliases),
            target.backend,
            ", ".join(target.precisions),
            target.arch or "any",
            _hardware(target),
            status,
        )
    console.print(table)
    for line in reasons:
        console.print(f"why not here: {line}", markup=False, overflow="ignore", crop=False)


@app.command()
def benchmark(
    targets: Annotated[
        str, typer.Option(help="comma-separated targets or aliases, e.g. x86-ort,x86-openvino,jetson")
    ],
    recipe: Annotated[
        Path | None, typer.Option(help="YAML recipe (default: recipes/radio-default.yaml)")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="run name: each target runs as <runs_dir>/<name>-<target>")
    ] = None,
    set_: SetFlag = None,
    device: Annotated[
        str | None, typer.Option(help="also profile every target's bundle on this device: user@host[:port]")
    ] = None,
    known_hosts: KnownHostsFlag = None,
    out: Annotated[
        Path | None, typer.Option(help="where the comparison goes (default: <runs_dir>/<name>-benchmark)")
    ] = None,
) -> None:
    """Compress one student for several targets and compare them: report.html, report.md, report.json."""
    from edgekd.hardware import benchmark as run_benchmark
    from edgekd.report.hardware import MEASUREMENT_HEADER, measurement_rows, peak_footnotes

    flags = {"name": name, "device.host": device, "device.known_hosts": known_hosts}
    comparison = run_benchmark(targets, recipe, _overrides(flags, set_ or []), out=out, log=log)
    table = Table(title=f"edgekd benchmark · {comparison['run']}")
    for column in MEASUREMENT_HEADER:
        table.add_column(column, justify="left" if column in ("target", "model / artifact") else "right")
    for row in measurement_rows(comparison):
        table.add_row(*row)
    console.print(table)
    for line in peak_footnotes(comparison):
        console.print(f"peak-ops share {line}", markup=False)
    for target in comparison["targets"]:
        if target["status"] != "measured":
            console.print(
                f"{target['name']}: {target['status']}: {target['why'] or '; '.join(target['host_problems'])}"
            )
    console.print(f"report: {comparison['out']}/report.html  report.md  report.json")


@app.command()
def methods() -> None:
    """List the distillation methods of each task: paper, options with their defaults, what each needs."""
    from edgekd.detection.distill import DETECTION_METHODS
    from edgekd.distill.methods import METHODS

    table = Table(
        title="edgekd distillation methods (recipe: distill.method, distill.options.<method>.<option>)"
    )
    for column in ("method", "task", "paper / loss", "options (default)", "needs"):
        table.add_column(column, overflow="fold")
    for name in METHODS.names():
        method = METHODS.get(name)
        options = ", ".join(f"{key}={info.default!r}" for key, info in method.Options.model_fields.items())
        needs = [
            label
            for label, flag in (
                ("teacher", method.needs_teacher),
                ("teacher (run by the method, live)", method.runs_teacher_itself),
                ("feature maps (live teacher)", method.needs_feature_maps),
                ("mixes inputs (live teacher)", method.mixes_inputs),
                ("held-out slice", method.held_out_fraction > 0),
                ("works with missing labels", method.supports_missing_labels),
            )
            if flag
        ]
        summary = " ".join((method.__doc__ or "").strip().split("\n\n")[0].split())
        table.add_row(name, "classification", summary, options or "-", ", ".join(needs) or "labels only")
    for name in DETECTION_METHODS.names():  # DETR students on detection data (scenes, coco, yolo)
        method = DETECTION_METHODS.get(name)
        options = ", ".join(f"{key}={info.default!r}" for key, info in method.Options.model_fields.items())
        needs = "boxes, teacher (DETR)" if method.needs_teacher else "boxes only"
        table.add_row(name, "detection", method.paper, options or "-", needs)
    console.print(table)


@app.command("search-student")
def search_student(
    candidates: Annotated[
        str, typer.Option(help="comma-separated candidate students, e.g. timm:resnet10t,timm:ghostnet_050")
    ],
    teacher: Annotated[str | None, typer.Option(help="teacher model, e.g. timm:resnet18")] = None,
    teacher_checkpoint: Annotated[
        Path | None, typer.Option(help="trained teacher weights (else the teacher is trained on the labels)")
    ] = None,
    data: Annotated[str | None, typer.Option(help="dataset, e.g. digits (default: the recipe's)")] = None,
    data_path: Annotated[Path | None, typer.Option(help="dataset file or directory")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe (teacher training, data)")] = None,
    name: Annotated[
        str | None, typer.Option(help="run name for the teacher stage (default: <data>-search)")
    ] = None,
    max_flops: Annotated[int | None, typer.Option(help="exclude candidates above this many FLOPs")] = None,
    max_latency_ms: Annotated[
        float | None, typer.Option(help="exclude candidates above this PyTorch FP32 p50 latency, batch 1")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="threads for the latency measurement")] = None,
    batch: Annotated[int, typer.Option(help="samples in the scoring batch")] = 64,
    epochs: Annotated[int | None, typer.Option(help="teacher training epochs")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the batch, candidates' init and teacher")] = None,
    set_: SetFlag = None,
    out: Annotated[Path | None, typer.Option(help="JSON output (default: models/search/<name>.json)")] = None,
) -> None:
    """Rank candidate students for a teacher without training them (DisWOT); lower score is better."""
    from edgekd.api import search_student as run_search
    from edgekd.distill.search import Budget, check_candidates

    names = check_candidates(candidates.split(","))
    budget = Budget(max_flops=max_flops, max_latency_ms=max_latency_ms, threads=threads)
    flags = {
        "name": name or (f"{data}-search" if data is not None and recipe is None else None),
        "data.name": data,
        "data.path": data_path,
        "teacher.model": teacher,
        "teacher.checkpoint": teacher_checkpoint,
        "teacher.train.epochs": epochs,
        "seed": seed,
    }
    resolved = load_recipe(recipe, _overrides(flags, set_ or []))
    result = run_search(resolved, names, budget, batch=batch, out=out, log=log)
    table = Table(title=f"edgekd search-student · {result['teacher']['model']} · {result['data']['name']}")
    columns = (
        "rank",
        "candidate",
        "score",
        "semantic",
        "relation",
        "params",
        "FLOPs",
        "p50 ms",
        "within budget",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for row in result["candidates"]:
        scored = row["score"] is not None
        table.add_row(
            str(row["rank"]) if row["rank"] is not None else "-",
            row["name"],
            f"{row['score']:.4f}" if scored else "-",
            f"{row['semantic']:.4f}" if scored else "-",
            f"{row['relation']:.4f}" if scored else "-",
            f"{row['params'] / 1e6:.2f}M",
            f"{row['flops'] / 1e6:.1f}M",
            f"{row['latency_ms']:.2f}",
            "yes" if row["within_budget"] else f"no: {row['excluded_because']}",
        )
    console.print(table)
    console.print(f"lower score = more similar to the teacher; ranking: {result['out']}")


@app.command()
def bundle(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory, e.g. models/runs/radio-default")],
    target: Annotated[str | None, typer.Option(help="target the run was compiled for (checked)")] = None,
    artifact: Annotated[
        str | None, typer.Option(help="precision whose artifact becomes model_data.c (fp32, fp16, int8)")
    ] = None,
) -> None:
    """Write RUN_DIR/bundle/<target>/: artifacts, manifest.json, model_data.h/.c, eval.npz, SHA256SUMS.

    report.json / report.md follow: they name the artifact the bundle embeds.
    """
    import json

    from edgekd.api import bundle as write

    directory = write(run_dir, target=target, precision=artifact)
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    console.print(f"deployment: {manifest['deployment']['reason']}")
    console.print(f"bundle: {directory}")
    console.print(f"report: {run_dir / 'report.md'}")


@app.command("verify-bundle")
def verify_bundle(
    bundle_dir: Annotated[Path, typer.Argument(help="a bundle directory, e.g. models/runs/x/bundle/x86-ort")],
) -> None:
    """Check every checksum, the C array against its artifact, and load and run each artifact."""
    from edgekd.bundle.verify import verify_bundle as verify

    table = Table(title=f"edgekd bundle {bundle_dir}: ok")
    table.add_column("check")
    table.add_column("result")
    for check, outcome in verify(bundle_dir):
        table.add_row(check, outcome)
    console.print(table)


# Usage errors: typer >= 0.20 raises its own vendored click's exceptions (TyperException), older
# versions click's; both carry format_message() and, for usage errors, the command's context.
_USAGE_ERRORS = (typer.TyperException, click.ClickException)


def _usage_line(exc: Exception) -> str:
    """A usage error (bad option value, unknown option or command, missing argument) as one line."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return message
    return f"{ctx.command_path}: {message} (see {ctx.command_path} --help)"


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        code = app(standalone_mode=False)  # usage errors come back here instead of a usage block
    except _USAGE_ERRORS as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `edgekd`: the help text, as before
            exc.show()
            sys.exit(exc.exit_code)
        print(f"edgekd: error: {_usage_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except (typer.Abort, click.exceptions.Abort):
        print("edgekd: error: aborted", file=sys.stderr)
        sys.exit(1)
    except EdgekdError as exc:
        print(f"edgekd: error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", EXIT_USER_ERROR))  # a failed rank that was no user error: 1
    except OSError as exc:  # a full disk or an unwritable path met outside edgekd's atomic writes
        import errno

        from edgekd.atomic import DISK_FULL, disk_error

        if exc.errno not in {*DISK_FULL, errno.EROFS, errno.EACCES, errno.EPERM}:
            raise
        verb = "write" if exc.errno in DISK_FULL else "access"
        print(f"edgekd: error: {disk_error(exc.filename or 'an output file', exc, verb)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    if isinstance(code, int) and code:
        sys.exit(code)  # e.g. 130 after Ctrl-C
