"""INT8 vs FP32 student vs FP32 teacher on the digits task, per student architecture and backend.

One ResNet-18 teacher (timm, trained once on scikit-learn's digits at 32x32, or --teacher-checkpoint)
is distilled (Hinton KD, the recipe's 15 epochs) into each student; every student is compiled and
profiled for ONNX Runtime (x86-ort: FP32, INT8 QDQ) and OpenVINO (x86-openvino: FP32, FP16, NNCF
INT8) through `edgekd benchmark`, so each backend's rows are measured in the same process, batch 1,
all cores. Reported per student, backend and precision: held-out accuracy, p50 latency, the speedup
over FP32 on the same backend and over the teacher in PyTorch FP32.

Prints a table and writes benchmarks/results/vision_int8.json.
    python benchmarks/vision_int8.py [--students timm:mobilenetv3_small_100 timm:resnet10t ...]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from rich.table import Table

from edgekd import atomic
from edgekd.api import compress
from edgekd.console import console
from edgekd.hardware import benchmark
from edgekd.recipe import load_recipe
from edgekd.report.build import environment

RESULTS = Path(__file__).resolve().parent / "results" / "vision_int8.json"
STUDENTS = ["timm:mobilenetv3_small_100", "timm:resnet10t", "timm:efficientnet_b0"]
BASE = ["data.name=digits", "teacher.model=timm:resnet18", "distill.method=kd"]


def _teacher(runs_dir: Path) -> Path:
    out = compress(load_recipe(None, [*BASE, f"runs_dir={runs_dir}", "name=teacher"]), until="teacher")
    return runs_dir / "teacher" / out["teacher"]["model_file"]


def _rows(student: str, report: dict) -> list[dict]:
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
    parser.add_argument("--students", nargs="+", default=STUDENTS)
    parser.add_argument("--teacher-checkpoint", type=Path, help="a trained timm:resnet18 digits teacher")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    args = parser.parse_args()
    runs_dir = Path(tempfile.mkdtemp(prefix="edgekd-vision-int8-"))
    rows: list[dict] = []
    try:
        teacher = args.teacher_checkpoint or _teacher(runs_dir)
        for student in args.students:
            console.print(f"== {student}")
            name = student.split(":")[-1]
            report = benchmark(
                "x86-ort,x86-openvino",
                overrides=[
                    *BASE,
                    *args.overrides,
                    f"runs_dir={runs_dir}",
                    f"name={name}",
                    f"student.model={student}",
                    f"teacher.checkpoint={teacher}",
                ],
                out=runs_dir / f"{name}-benchmark",
                log=lambda _: None,
            )
            rows += _rows(student, report)
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)

    table = Table(title="digits: INT8 vs FP32 student vs FP32 teacher (batch 1, p50)")
    for column in ("student", "backend", "precision", "accuracy", "p50 ms", "vs FP32", "vs teacher"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["student"],
            row["backend"],
            row["precision"],
            f"{row['accuracy']:.4f}",
            f"{row['p50_ms']:.3f}",
            "–" if row["speedup_vs_fp32_same_backend"] is None else f"{row['speedup_vs_fp32_same_backend']}x",
            f"{row['speedup_vs_teacher_torch_fp32']}x",
        )
    console.print(table)
    atomic.write_json(RESULTS, {"benchmark": "vision_int8", "environment": environment(), "rows": rows})
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
