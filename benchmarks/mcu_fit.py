"""Which microcontroller does each distilled student fit, and what does INT8 under TFLM cost in accuracy?

Per student (the radio students KD-CNN and KD-MobileNet on the default radio task, and a small vision
student, ``edgekd:cnn`` on scikit-learn's digits): ``edgekd compress --target cortex-m4`` (distil,
litert-torch PT2E INT8 ``.tflite``, TFLM arena, profile under TFLM), then the same run for ``cpu``
(ONNX Runtime INT8 QDQ; the teacher and distill stages are reused from the run directory). Reported:
parameters, MACs, ``.tflite`` size, measured arena, held-out accuracy FP32 (PyTorch) vs INT8 ``.tflite``
(TFLM) vs ONNX INT8 (ONNX Runtime), the cycle estimate on each core, and which targets it fits
(flash and SRAM against each ``cortex-m*`` target's datasheet budget).

Goal (issue 15): the distilled KD-CNN fits the Cortex-M4 target with <= 1 point INT8 loss.

Needs the mcu extra (``pip install -e '.[mcu]'``). Writes benchmarks/results/mcu_fit.json (or ``--out``).
    python benchmarks/mcu_fit.py [--students radio:edgekd:kd-cnn ...] [--set FIELD=VALUE ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rich.table import Table

from edgekd import atomic
from edgekd.api import compress
from edgekd.console import console
from edgekd.errors import EdgekdError, first_line
from edgekd.mcu.cycles import estimate_cycles
from edgekd.mcu.fit import fit_check
from edgekd.mcu.tflite_model import read_tflite
from edgekd.recipe import load_recipe
from edgekd.report.build import environment
from edgekd.targets import load_targets

RESULTS = Path(__file__).resolve().parent / "results" / "mcu_fit.json"
TASKS = {
    "radio": [],  # the default recipe: radio-synthetic, shipped ClST teacher
    "digits": [  # scikit-learn's digits at 32x32, ResNet-18 teacher trained on the labels
        "data.name=digits",
        "teacher.model=timm:resnet18",
        "teacher.checkpoint=null",
        "teacher.train.epochs=10",
        "distill.train.epochs=10",
        "distill.method=kd",
    ],
}
STUDENTS = ["radio:edgekd:kd-cnn", "radio:edgekd:kd-mobilenet", "digits:timm:mobilenetv3_small_050"]


def _row(report: dict[str, Any], runtime: str) -> dict[str, Any] | None:
    return next((r for r in report["rows"] if r.get("runtime") == runtime and r["role"] == "student"), None)


def measure(task: str, student: str, runs_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """One student: compress for cortex-m4 and for cpu in one run directory; the table row."""
    base = [
        *TASKS[task],
        f"student.model={student}",
        f"runs_dir={runs_dir}",
        f"name={task}-{student.replace(':', '-')}",
        *overrides,
    ]
    mcu_report = compress(load_recipe(None, [*base, "target=cortex-m4"]))  # the report, as a dict
    run_dir = runs_dir / f"{task}-{student.replace(':', '-')}"
    stage = json.loads(next(run_dir.glob("*-compile/stage.json")).read_text())
    compiled = stage["outputs"]["artifacts"][0]
    tflite = run_dir / compiled["path"]
    mcu = compiled["metadata"]["mcu"]
    cpu_report = compress(load_recipe(None, [*base, "target=cpu"]))
    torch_row, tflm_row = _row(mcu_report, "torch"), _row(mcu_report, "litert")
    onnx_rows = [
        r for r in cpu_report["rows"] if r.get("runtime") == "onnxruntime" and r["precision"] == "int8"
    ]
    model = read_tflite(tflite)
    arena = mcu["arena"]["total_bytes"]
    targets = {name: t for name, t in load_targets().items() if t.mcu}
    fits = {name: fit_check(model, arena, t.mcu) for name, t in targets.items()}
    fp32 = torch_row["accuracy"]["accuracy"]
    int8 = tflm_row["accuracy"]["accuracy"]
    return {
        "task": task,
        "student": student,
        "params": torch_row.get("params"),
        "macs": model.macs,
        "tflite_bytes": model.size_bytes,
        "arena_bytes": arena,
        "accuracy_fp32": fp32,
        "accuracy_tflite_int8_tflm": int8,
        "accuracy_onnx_int8": onnx_rows[0]["accuracy"]["accuracy"] if onnx_rows else None,
        "int8_loss_points": round(100 * (fp32 - int8), 2),
        "agreement_tflm_vs_fp32": tflm_row["accuracy"].get("agreement"),
        "interpreter_agreement": mcu["interpreter_agreement"],
        "cycles_estimate": {
            name: estimate_cycles(model, t.mcu["core"], t.mcu["clock_mhz"]) for name, t in targets.items()
        },
        "fits": {name: fit["fits"] for name, fit in fits.items()},
        "fit": fits,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--students", nargs="+", default=STUDENTS, help="TASK:MODEL, e.g. radio:edgekd:kd-cnn"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe FIELD=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs_dir = Path(tempfile.mkdtemp(prefix="edgekd-mcu-fit-"))
    try:
        rows = []
        for spec in args.students:
            task, _, student = spec.partition(":")
            try:
                rows.append(measure(task, student, runs_dir, args.overrides))
            except EdgekdError as exc:  # a student that does not convert is a row, not the end of the table
                rows.append({"task": task, "student": student, "error": first_line(exc)})
                console.print(f"{spec}: {first_line(exc)}")
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    table = Table(title="edgekd · students on microcontrollers (TFLM INT8)")
    for column in (
        "student",
        "params",
        "MACs",
        ".tflite",
        "arena",
        "FP32",
        "INT8 TFLM",
        "ONNX INT8",
        "M4 ms*",
        "fits",
    ):
        table.add_column(column)
    for row in rows:
        if "error" in row:
            table.add_row(f"{row['task']}:{row['student']}", *["-"] * 8, f"failed: {row['error']}")
            continue
        table.add_row(
            f"{row['task']}:{row['student']}",
            f"{row['params']:,}" if row["params"] else "-",
            f"{row['macs']:,}",
            f"{row['tflite_bytes'] / 1024:.1f} KiB",
            f"{row['arena_bytes'] / 1024:.1f} KiB",
            f"{row['accuracy_fp32']:.4f}",
            f"{row['accuracy_tflite_int8_tflm']:.4f}",
            "-" if row["accuracy_onnx_int8"] is None else f"{row['accuracy_onnx_int8']:.4f}",
            f"{row['cycles_estimate']['cortex-m4']['ms']:.1f}",
            ", ".join(name for name, ok in row["fits"].items() if ok) or "none",
        )
    console.print(table)
    console.print("* estimated from the op list and MACs (edgekd/mcu/cycles.py), not measured")
    atomic.write_json(args.out, {"environment": environment(), "overrides": args.overrides, "rows": rows})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
