"""Radio pipeline benchmark: stage wall times, deployed-student vs teacher latency, and KD accuracy.

Measured side by side in one run on this machine:
1. the default pipeline (`edgekd compress --target cpu`, recipes/radio-default.yaml) from an empty run
   directory: wall time of each stage and of the whole run; student INT8 ONNX Runtime latency against
   the teacher's FP32 PyTorch latency (ratio, same protocol, same process);
2. the student trained on labels alone (`none`), with Hinton KD (`kd`) and with SKD (`skd`), over
   3 seeds each (each seed has its own teacher, shared by the three methods): held-out accuracy
   mean ± std, last epoch and best epoch.

Prints tables and writes benchmarks/results/radio_pipeline.json (or ``--out``). ``--set`` overrides
go to every run (e.g. ``--set teacher.train.epochs=1 --set distill.train.epochs=1`` for a quick check
that it runs; the published numbers use none).
    python benchmarks/radio_pipeline.py [--seeds 0 1 2] [--methods none kd skd] [--set FIELD=VALUE ...]
        [--out FILE]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from rich.table import Table

from edgekd import atomic
from edgekd.api import compress
from edgekd.console import console
from edgekd.recipe import load_recipe
from edgekd.report.build import environment

RESULTS = Path(__file__).resolve().parent / "results" / "radio_pipeline.json"


def default_pipeline(runs_dir: Path, overrides: list[str]) -> dict:
    """The README's main job, from scratch, timed per stage."""
    recipe = load_recipe(None, [*overrides, f"runs_dir={runs_dir}", "name=seed-0"])
    start = time.perf_counter()
    report = compress(recipe, log=lambda _: None)
    total = time.perf_counter() - start
    rows = {row["name"]: row for row in report["rows"]}
    teacher = next(r for r in report["rows"] if r["role"] == "teacher")
    int8 = next(r for r in report["rows"] if r["precision"] == "int8")
    return {
        "total_wall_s": round(total, 1),
        "stage_wall_s": {name: stage["wall_s"] for name, stage in report["stages"].items()},
        "teacher_fp32_torch_p50_ms": teacher["latency"]["p50_ms"],
        "student_int8_ort_p50_ms": int8["latency"]["p50_ms"],
        "latency_ratio_teacher_over_student_int8": round(
            teacher["latency"]["p50_ms"] / int8["latency"]["p50_ms"], 2
        ),
        "accuracy": {name: row["accuracy"]["accuracy"] for name, row in rows.items()},
        "headline": report["headline"],
    }


def method_accuracy(runs_dir: Path, seeds: list[int], methods: list[str], overrides: list[str]) -> dict:
    """Student accuracy per method and seed; one teacher per seed shared by all methods.

    Seed 0's teacher is the one the default pipeline run (run dir `seed-0`) already trained: cached.
    """
    per_method: dict[str, list[dict]] = {m: [] for m in methods}
    teachers: dict[int, dict] = {}
    for seed in seeds:
        teacher_run = compress(
            load_recipe(None, [*overrides, f"runs_dir={runs_dir}", f"name=seed-{seed}", f"seed={seed}"]),
            until="teacher",
            log=lambda _: None,
        )
        teacher_file = runs_dir / f"seed-{seed}" / teacher_run["teacher"]["model_file"]
        teachers[seed] = {"val_accuracy": teacher_run["teacher"]["val_accuracy"]}
        for method in methods:
            console.print(f"seed {seed} · {method}")
            out = compress(
                load_recipe(
                    None,
                    [
                        *overrides,
                        f"runs_dir={runs_dir}",
                        f"name={method}-s{seed}",
                        f"seed={seed}",
                        f"distill.method={method}",
                        f"teacher.checkpoint={teacher_file}",
                    ],
                ),
                until="distill",
                log=lambda _: None,
            )
            student = out["distill"]
            per_method[method].append(
                {
                    "seed": seed,
                    "last": student["val_accuracy_last"],
                    "best": student["val_accuracy_best"],
                    "best_epoch": student["best_epoch"],
                }
            )
    summary = {}
    for method, runs in per_method.items():
        last = [r["last"] for r in runs]
        best = [r["best"] for r in runs]
        summary[method] = {
            "last_mean": round(statistics.mean(last), 4),
            "last_std": round(statistics.stdev(last), 4) if len(last) > 1 else 0.0,
            "best_mean": round(statistics.mean(best), 4),
            "best_std": round(statistics.stdev(best), 4) if len(best) > 1 else 0.0,
            "runs": runs,
        }
    teacher_acc = [t["val_accuracy"] for t in teachers.values()]
    summary["teacher"] = {
        "last_mean": round(statistics.mean(teacher_acc), 4),
        "last_std": round(statistics.stdev(teacher_acc), 4) if len(teacher_acc) > 1 else 0.0,
    }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["none", "kd", "skd"])
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE", help="recipe override"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON to write")
    args = parser.parse_args()
    runs_dir = Path(tempfile.mkdtemp(prefix="edgekd-bench-"))
    try:
        pipeline = default_pipeline(runs_dir, args.overrides)
        methods = method_accuracy(runs_dir, args.seeds, args.methods, args.overrides)
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)

    stages = Table(title="default pipeline (edgekd compress --target cpu)")
    for column in ("stage", "wall s"):
        stages.add_column(column)
    for name, wall in pipeline["stage_wall_s"].items():
        stages.add_row(name, f"{wall:.1f}")
    stages.add_row("total", f"{pipeline['total_wall_s']:.1f}")
    console.print(stages)
    console.print(
        f"teacher FP32 PyTorch p50 / student INT8 ONNX Runtime p50 = "
        f"{pipeline['latency_ratio_teacher_over_student_int8']}x"
    )
    acc = Table(title=f"student accuracy by method, seeds {args.seeds} (mean ± std)")
    for column in ("method", "last epoch", "best epoch"):
        acc.add_column(column)
    for method, row in methods.items():
        best = f"{row['best_mean']:.4f} ± {row['best_std']:.4f}" if "best_mean" in row else "–"
        acc.add_row(method, f"{row['last_mean']:.4f} ± {row['last_std']:.4f}", best)
    console.print(acc)
    atomic.write_json(
        args.out,
        {
            "benchmark": "radio_pipeline",
            "environment": environment(),
            "seeds": args.seeds,
            "overrides": args.overrides,
            "pipeline": pipeline,
            "methods": methods,
        },
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
