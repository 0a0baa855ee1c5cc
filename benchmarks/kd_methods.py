"""Every distillation method × the built-in tasks × seeds: student accuracy, relative gains, wall time.

Per task and seed the task's default recipe gives one teacher (on the radio task the shipped teacher,
``builtin:clst-radio-synthetic``, the same for every seed; on digits one trained per seed), shared by
every method, so the methods differ only in their loss. Each method distils the task's default
student with its paper defaults (`edgekd methods`) for the recipe's epochs; the deployed (last-epoch)
model is scored on the held-out split. Reported per method: accuracy mean ± std over seeds, the gain over the
student trained alone (`none`, same seed, in points), the share of the teacher–student gap it
closes, and the distill stage's wall time (teacher outputs come from the shared cache; methods
that need the teacher's feature maps or mixed inputs run it live, which the wall time shows).

Prints a table (and, with --markdown, the README's table) and writes benchmarks/results/kd_methods.json,
keeping the tasks not run this time (each task records its own seeds, overrides and environment).
    python benchmarks/kd_methods.py [--seeds 0 1 2] [--methods none kd dkd] [--tasks radio]
                                    [--set FIELD=VALUE ...] [--out FILE]
With --methods, the rows of the other methods are kept from the earlier run of the same task, seeds and
overrides (marked ``from_earlier_run``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from rich.table import Table

from edgekd import atomic
from edgekd.api import compress
from edgekd.console import console
from edgekd.distill.methods import METHODS
from edgekd.recipe import load_recipe
from edgekd.report.build import environment

RESULTS = Path(__file__).resolve().parent / "results" / "kd_methods.json"
TASKS: dict[str, list[str]] = {
    "radio": [],  # recipes/radio-default.yaml: synthetic RadioML-style frames, ClST -> KD-CNN
    "digits": [  # scikit-learn's handwritten digits at 32x32, ResNet-18 -> MobileNetV3-Small (timm)
        "data.name=digits",
        "teacher.model=timm:resnet18",
        "teacher.checkpoint=null",
        "student.model=timm:mobilenetv3_small_100",
        "teacher.train.epochs=15",  # pinned: the radio recipe's epochs are sized for its own task
        "distill.train.epochs=15",
    ],
}
DEFAULT_TASKS = ["radio"]  # digits adds about an hour on 2 cores: --tasks radio digits


def _run(runs_dir: Path, name: str, overrides: list[str], until: str) -> tuple[dict, float]:
    """Run the pipeline up to ``until``; its outputs and the wall time of that stage."""
    recipe = load_recipe(None, [f"runs_dir={runs_dir}", f"name={name}", *overrides])
    outputs = compress(recipe, until=until, log=lambda _: None)
    record = next((runs_dir / name).glob(f"*-{until}/stage.json"))
    return outputs, json.loads(record.read_text(encoding="utf-8"))["wall_s"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return round(statistics.mean(values), 4), round(statistics.stdev(values), 4) if len(values) > 1 else 0.0


def benchmark_task(
    task: str, overrides: list[str], seeds: list[int], methods: list[str], runs_dir: Path
) -> dict:
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    teachers: list[float] = []
    for seed in seeds:
        teacher_out, _ = _run(runs_dir, f"{task}-teacher-s{seed}", [*overrides, f"seed={seed}"], "teacher")
        teacher_file = runs_dir / f"{task}-teacher-s{seed}" / teacher_out["teacher"]["model_file"]
        teachers.append(teacher_out["teacher"]["val_accuracy"])
        for method in methods:
            console.print(f"[{task}] seed {seed} · {method}")
            out, wall = _run(
                runs_dir,
                f"{task}-{method}-s{seed}",
                [
                    *overrides,
                    f"seed={seed}",
                    f"distill.method={method}",
                    f"teacher.checkpoint={teacher_file}",
                ],
                "distill",
            )
            runs[method].append(
                {"seed": seed, "accuracy": out["distill"]["val_accuracy_last"], "wall_s": wall}
            )
    teacher_mean, teacher_std = _mean_std(teachers)
    baseline = {r["seed"]: r["accuracy"] for r in runs.get("none", [])}
    rows = {}
    for method, method_runs in runs.items():
        accuracy = [r["accuracy"] for r in method_runs]
        mean, std = _mean_std(accuracy)
        row = {
            "accuracy_mean": mean,
            "accuracy_std": std,
            "wall_s_mean": round(statistics.mean(r["wall_s"] for r in method_runs), 1),
            "runs": method_runs,
        }
        if baseline:
            gains = [r["accuracy"] - baseline[r["seed"]] for r in method_runs]
            row["gain_vs_none_pts"] = round(100 * statistics.mean(gains), 2)
            gap = teacher_mean - statistics.mean(baseline.values())
            row["teacher_gap_closed"] = round(statistics.mean(gains) / gap, 2) if abs(gap) > 1e-9 else None
        row["accuracy_vs_teacher"] = round(mean / teacher_mean, 4)
        rows[method] = row
    return {
        "teacher": {"accuracy_mean": teacher_mean, "accuracy_std": teacher_std, "per_seed": teachers},
        "methods": rows,
    }


def _table(task: str, result: dict) -> Table:
    teacher = result["teacher"]
    table = Table(title=f"{task}: teacher {teacher['accuracy_mean']:.4f} ± {teacher['accuracy_std']:.4f}")
    for column in ("method", "accuracy", "vs none (pts)", "gap closed", "vs teacher", "distill s"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for method, row in sorted(result["methods"].items(), key=lambda kv: -kv[1]["accuracy_mean"]):
        closed = row.get("teacher_gap_closed")
        table.add_row(
            method,
            f"{row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f}",
            f"{row.get('gain_vs_none_pts', 0):+.2f}",
            "–" if closed is None else f"{closed:+.2f}",
            f"{row['accuracy_vs_teacher']:.3f}",
            f"{row['wall_s_mean']:.1f}",
        )
    return table


def _markdown(task: str, result: dict) -> str:
    teacher = result["teacher"]
    lines = [
        f"Task `{task}`, teacher {teacher['accuracy_mean']:.4f} ± {teacher['accuracy_std']:.4f}",
        "",
        "| method | accuracy (mean ± std) | vs none (pts) | teacher gap closed | distill wall s |",
        "|---|---|---|---|---|",
    ]
    for method, row in sorted(result["methods"].items(), key=lambda kv: -kv[1]["accuracy_mean"]):
        closed = row.get("teacher_gap_closed")
        lines.append(
            f"| {method} | {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} | "
            f"{row.get('gain_vs_none_pts', 0):+.2f} | {'–' if closed is None else f'{closed:+.2f}'} | "
            f"{row['wall_s_mean']:.1f} |"
        )
    return "\n".join(lines)


def _keep_methods_not_rerun(result: dict, earlier: dict | None) -> None:
    """Carry over the rows of methods this run did not train from an earlier run of the same task, seeds
    and overrides (marked ``"from_earlier_run": true``), so rerunning a few changed methods keeps the
    table whole. Their gains stay relative to the earlier run's ``none``."""
    same_setup = earlier and all(earlier.get(key) == result[key] for key in ("seeds", "overrides"))
    if not same_setup:
        return
    for method, row in earlier["methods"].items():
        if method not in result["methods"] and method in METHODS.names():
            result["methods"][method] = {**row, "from_earlier_run": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS.names())
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=list(TASKS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    parser.add_argument("--markdown", action="store_true", help="also print the README table")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (one per setting)")
    args = parser.parse_args()
    methods = ["none", *[m for m in args.methods if m != "none"]]  # the baseline every gain refers to
    runs_dir = Path(tempfile.mkdtemp(prefix="edgekd-kd-methods-"))
    try:
        results = {
            task: benchmark_task(task, [*TASKS[task], *args.overrides], args.seeds, methods, runs_dir)
            for task in args.tasks
        }
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    for task, result in results.items():
        console.print(_table(task, result))
        if args.markdown:
            console.print(_markdown(task, result), markup=False, highlight=False)
    for result in results.values():
        result.update(seeds=args.seeds, overrides=args.overrides, environment=environment())
    kept = json.loads(args.out.read_text(encoding="utf-8"))["tasks"] if args.out.is_file() else {}
    for task, result in results.items():
        _keep_methods_not_rerun(result, kept.get(task))
    tasks = {**{task: kept_result for task, kept_result in kept.items() if task not in results}, **results}
    atomic.write_json(args.out, {"benchmark": "kd_methods", "tasks": tasks})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
