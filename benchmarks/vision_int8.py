"""INT8 vs FP32 student vs FP32 teacher, per task, student architecture and backend.

Tasks: ``digits`` (scikit-learn's 8x8 digits, built in) and ``mnist-folder`` (5,000 MNIST digits as a
real ImageFolder of PNG files, written by ``benchmarks/mnist_folder.py`` and read through
``data.name=imagefolder``, the path a user's own folder takes). Per task, one ResNet-18 teacher (timm,
trained once at 32x32, or --teacher-checkpoint) is distilled (Hinton KD, the recipe's 15 epochs) into
each student; every student is compiled and
profiled for ONNX Runtime (x86-ort: FP32, INT8 QDQ) and OpenVINO (x86-openvino: FP32, FP16, NNCF
INT8) through `edgekd benchmark`, so each backend's rows are measured in the same process, batch 1,
all cores. Reported per student, backend and precision: held-out accuracy, p50 latency, the speedup
over FP32 on the same backend and over the teacher in PyTorch FP32.

Prints a table and writes benchmarks/results/vision_int8.json (or ``--out``); rows of tasks not run
this time are kept from the previous file.
    python benchmarks/vision_int8.py [--tasks digits mnist-folder] [--folder DIR] [--students ...]
        [--set FIELD=VALUE ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from mnist_folder import write_folder  # benchmarks/ is on sys.path: the scripts run from there
from rich.table import Table

from edgekd import atomic
from edgekd.api import compress
from edgekd.console import console
from edgekd.hardware import benchmark
from edgekd.recipe import load_recipe
from edgekd.report.build import environment

RESULTS = Path(__file__).resolve().parent / "results" / "vision_int8.json"
STUDENTS = ["timm:mobilenetv3_small_100", "timm:resnet10t", "timm:efficientnet_b0"]
BASE = ["teacher.model=timm:resnet18", "teacher.checkpoint=null", "distill.method=kd"]
TASKS = {
    "digits": lambda: ["data.name=digits"],
    "mnist-folder": lambda: ["data.name=imagefolder", f"data.path={write_folder()}"],
}


def _teacher(runs_dir: Path, task: list[str]) -> Path:
    recipe = load_recipe(None, [*BASE, *task, f"runs_dir={runs_dir}", "name=teacher"])
    out = compress(recipe, until="teacher")
    return runs_dir / "teacher" / out["teacher"]["model_file"]


def _rows(task: str, student: str, report: dict) -> list[dict]:
    """Per compiled artifact: accuracy, p50 and the speedups, from one student's comparison report."""
    rows = [r for r in report["rows"] if r.get("latency") and r["latency"].get("p50_ms")]
    teacher = next(r for r in rows if r["role"] == "teacher")
    out = []
    for row in rows:
        if row["runtime"] not in ("onnxruntime", "openvino"):
            continue
        fp32 = next((r for r in rows if r["runtime"] == row["runtime"] and r["precision"] == "fp32"), None)
        p50 = row["latency"]["p50_ms"]
        out.append(
            {
                "task": task,
                "student": student,
                "backend": row["runtime"],
                "precision": row["precision"],
                "accuracy": row["accuracy"],
                "teacher_accuracy": teacher["accuracy"],
                "p50_ms": p50,
                "speedup_vs_fp32_same_backend": round(fp32["latency"]["p50_ms"] / p50, 2) if fp32 else None,
                "speedup_vs_teacher_torch_fp32": round(teacher["latency"]["p50_ms"] / p50, 1),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--folder", type=Path, help="also run your own ImageFolder DIR as task 'folder:DIR'")
    parser.add_argument("--students", nargs="+", default=STUDENTS)
    parser.add_argument("--teacher-checkpoint", type=Path, help="a trained timm:resnet18 digits teacher")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON to write (and to keep rows from)")
    args = parser.parse_args()
    tasks = {name: TASKS[name] for name in args.tasks}
    if args.folder is not None:
        folder = args.folder.resolve()
        tasks[f"folder:{folder}"] = lambda: ["data.name=imagefolder", f"data.path={folder}"]
    rows: list[dict] = []
    for task, task_data in tasks.items():
        runs_dir = Path(tempfile.mkdtemp(prefix="edgekd-vision-int8-"))
        try:
            task_overrides = [*task_data(), *args.overrides]
            teacher = args.teacher_checkpoint or _teacher(runs_dir, task_overrides)
            for student in args.students:
                console.print(f"== {task}: {student}")
                name = student.split(":")[-1]
                report = benchmark(
                    "x86-ort,x86-openvino",
                    overrides=[
                        *BASE,
                        *task_overrides,
                        f"runs_dir={runs_dir}",
                        f"name={name}",
                        f"student.model={student}",
                        f"teacher.checkpoint={teacher}",
                    ],
                    out=runs_dir / f"{name}-benchmark",
                    log=lambda _: None,
                )
                rows += _rows(task, student, report)
        finally:
            shutil.rmtree(runs_dir, ignore_errors=True)
    kept = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    rows = [row for row in kept if row["task"] not in tasks] + rows

    table = Table(title="INT8 vs FP32 student vs FP32 teacher (batch 1, p50)")
    for column in ("task", "student", "backend", "precision", "accuracy", "p50 ms", "vs FP32", "vs teacher"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["task"],
            row["student"],
            row["backend"],
            row["precision"],
            f"{row['accuracy']:.4f}",
            f"{row['p50_ms']:.3f}",
            "–" if row["speedup_vs_fp32_same_backend"] is None else f"{row['speedup_vs_fp32_same_backend']}x",
            f"{row['speedup_vs_teacher_torch_fp32']}x",
        )
    console.print(table)
    atomic.write_json(args.out, {"benchmark": "vision_int8", "environment": environment(), "rows": rows})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
