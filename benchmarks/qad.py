"""Quantisation-aware distillation vs post-training INT8, on students where PTQ loses accuracy.

Per case (task, student, target, weight granularity) and seed, three runs share the teacher and the
distilled student (same run directory, the stages are cached):

- ``ptq``: post-training INT8 (FP32 and INT8 held-out accuracy and p50 from the profile stage);
- ``ptq_float_nodes``: ``quantize.max_accuracy_drop=0``, the accuracy-aware rung (most damaging nodes
  kept in float until the drop on the budget frames fits, or everything is float);
- ``qad``: ``quantize.mode=qad`` (edgekd's quantisation-aware distillation, one QDQ ONNX);
- on OpenVINO targets also ``nncf_qat``, the peer: ``nncf.quantize`` on the PyTorch student (NNCF's
  own fake quantisers), then the same KD fine-tuning loop and budget as QAD, converted to OpenVINO.

Reported: held-out top-1, drop vs FP32, p50 (batch 1), seconds spent quantising. Prints a table and
writes benchmarks/results/qad.json with the settings of every row.

    python benchmarks/qad.py [--cases NAME ...] [--seeds 0 1 2] [--set FIELD=VALUE ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from edgekd import atomic
from edgekd.api import compress
from edgekd.console import console
from edgekd.report.build import environment

RESULTS = Path(__file__).resolve().parent / "results" / "qad.json"
VISION = ["data.name=digits", "teacher.model=timm:resnet18", "teacher.checkpoint=null", "distill.method=kd"]
CASES: dict[str, list[str]] = {
    "digits-efficientnet_b0-ort": [*VISION, "student.model=timm:efficientnet_b0", "target=x86-ort"],
    "digits-mobilenetv3-per-tensor-ort": [
        *VISION,
        "student.model=timm:mobilenetv3_small_100",
        "quantize.per_channel=false",
        "target=x86-ort",
    ],
    "radio-per-tensor-ort": ["quantize.per_channel=false", "target=x86-ort"],
    "radio-per-tensor-openvino": ["quantize.per_channel=false", "target=x86-openvino"],
}
TINY = [
    "data.frames_per_class_snr=4",
    "teacher.train.epochs=1",
    "distill.train.epochs=2",
    "quantize.calibration_samples=64",
    "quantize.accuracy_samples=64",
    "profile.iterations=20",
    "profile.warmup=2",
]


def _int8_row(report: dict[str, Any], precision: str) -> dict[str, Any] | None:
    return next(
        (
            r
            for r in report["rows"]
            if r.get("role") == "student"
            and r.get("runtime") != "pytorch"
            and r.get("precision") == precision
        ),
        None,
    )


def _stage_seconds(run: Path, stage: str) -> float | None:
    found = sorted(run.glob(f"*-{stage}/stage.json"))
    return json.loads(found[0].read_text())["wall_s"] if found else None


def _one(runs: Path, case: str, sets: list[str], seed: int, variant: str, extra: list[str]) -> dict[str, Any]:
    name = f"{case}-s{seed}"
    started = time.perf_counter()
    compress(None, [f"runs_dir={runs}", f"name={name}", f"seed={seed}", *sets, *extra], log=lambda _: None)
    run = runs / name
    report = json.loads((run / "report.json").read_text())
    fp32, int8 = _int8_row(report, "fp32"), _int8_row(report, "int8")
    for row in (fp32, int8):
        if row is not None and isinstance(row["accuracy"], dict):
            row["accuracy"] = row["accuracy"]["accuracy"]
    quantize_s = _stage_seconds(run, "quantize") or 0.0
    if report["target"]["backend"] == "openvino":
        quantize_s += _stage_seconds(run, "compile") or 0.0  # NNCF (or the QAD IR) is built there
    return {
        "case": case,
        "seed": seed,
        "variant": variant,
        "settings": [*sets, *extra],
        "fp32_accuracy": fp32["accuracy"] if fp32 else None,
        "accuracy": int8["accuracy"] if int8 else None,
        "drop": None if not (fp32 and int8) else round(fp32["accuracy"] - int8["accuracy"], 5),
        "p50_ms": int8["latency"]["p50_ms"] if int8 else None,
        "fp32_p50_ms": fp32["latency"]["p50_ms"] if fp32 else None,
        "quantize_seconds": round(quantize_s, 2),
        "ladder": report.get("budget_ladder"),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def _nncf_qat(runs: Path, case: str, sets: list[str], seed: int, epochs: int) -> dict[str, Any]:
    """The peer row: NNCF's QAT (``nncf.quantize`` on the PyTorch student) + our KD fine-tuning loop."""
    import nncf
    import openvino as ov
    import torch

    from edgekd.distill.methods import METHODS, ModelShape
    from edgekd.pipeline import RunContext
    from edgekd.quantize.qad import QadData, fine_tune
    from edgekd.recipe import load_recipe
    from edgekd.stages.quantize import _budget_indices, calibration_set, load_teacher, qad_lr

    run = runs / f"{case}-s{seed}"
    recipe = load_recipe(None, [f"runs_dir={runs}", f"name={run.name}", f"seed={seed}", *sets])
    ctx = RunContext(recipe, run, log=lambda _: None)
    from edgekd.pipeline import read_record

    for stage in ("teacher", "distill"):
        record, _ = read_record(next(run.glob(f"*-{stage}/stage.json")))
        from edgekd.pipeline import StageResult

        ctx.results[stage] = StageResult(stage, record["outputs"], record["fingerprint"], 0.0, True, run)
    from edgekd.stages.model_import import load_student

    started = time.perf_counter()
    train_set, val_set, meta = ctx.dataset
    student, teacher = load_student(ctx), load_teacher(ctx)
    calib = calibration_set(ctx)
    quantized = nncf.quantize(
        student, nncf.Dataset([torch.from_numpy(calib.data[i : i + 1]) for i in range(len(calib))])
    )
    rows = np.setdiff1d(np.arange(len(train_set)), _budget_indices(ctx))
    with torch.no_grad():
        logits = np.concatenate(
            [
                teacher(torch.from_numpy(train_set.x[rows][i : i + 256])).numpy()
                for i in range(0, len(rows), 256)
            ]
        )
    shape = ModelShape(int(student.feature_dim))
    method = METHODS.get("kd")(
        recipe.distill.model_copy(update={"method": "kd"}), len(meta.classes), shape, shape
    )
    fine_tune(
        quantized,
        method,
        QadData(train_set.x[rows], train_set.y[rows], logits),
        epochs,
        qad_lr(recipe),
        recipe.distill.train.batch_size,
        seed,
        log=lambda _: None,
    )
    quantized.eval()
    example = torch.from_numpy(val_set.x[:1])
    model = ov.convert_model(quantized, example_input=example)
    compiled = ov.Core().compile_model(model, "CPU")
    predicted = np.concatenate([compiled(val_set.x[i : i + 64])[0] for i in range(0, len(val_set), 64)])
    seconds = time.perf_counter() - started
    feed = val_set.x[:1]
    for _ in range(10):
        compiled(feed)
    times = []
    for _ in range(100):
        t0 = time.perf_counter()
        compiled(feed)
        times.append(time.perf_counter() - t0)
    return {
        "case": case,
        "seed": seed,
        "variant": "nncf_qat",
        "settings": {"nncf": nncf.__version__, "epochs": epochs, "lr": qad_lr(recipe), "loss": "kd + CE"},
        "accuracy": float(np.mean(predicted.argmax(1) == val_set.y)),
        "p50_ms": round(float(np.median(times)) * 1e3, 4),
        "quantize_seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tiny", action="store_true", help="smoke settings: very little data and training")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgekd-qad-") as tmp:
        runs = Path(tmp)
        for case in args.cases:
            sets = [*CASES[case], *(TINY if args.tiny else []), *args.overrides]
            for seed in args.seeds:
                ptq = _one(runs, case, sets, seed, "ptq", [])
                rows.append(ptq)
                rows.append(_one(runs, case, sets, seed, "ptq_float_nodes", ["quantize.max_accuracy_drop=0"]))
                qad = _one(runs, case, sets, seed, "qad", ["quantize.mode=qad"])
                rows.append(qad)
                if "openvino" in case:
                    try:
                        peer = _nncf_qat(runs, case, sets, seed, epochs=3)
                        peer["fp32_accuracy"] = ptq["fp32_accuracy"]
                        peer["drop"] = round(ptq["fp32_accuracy"] - peer["accuracy"], 5)
                        rows.append(peer)
                    except Exception as exc:  # the peer's failure is a result, not a crash
                        rows.append(
                            {"case": case, "seed": seed, "variant": "nncf_qat", "error": repr(exc)[:300]}
                        )
    table = Table(title="QAD vs PTQ (held-out top-1; p50 batch 1)")
    for column in ("case", "seed", "variant", "fp32", "int8", "drop", "p50 ms", "quantise s"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["case"],
            str(row["seed"]),
            row["variant"],
            *(
                "—"
                if row.get(key) is None
                else f"{row[key]:.4f}"
                if key != "quantize_seconds"
                else f"{row[key]:.1f}"
                for key in ("fp32_accuracy", "accuracy", "drop", "p50_ms", "quantize_seconds")
            ),
        )
    console.print(table)
    atomic.write_json(
        args.out,
        {
            "benchmark": "qad",
            "seeds": args.seeds,
            "tiny": args.tiny,
            "overrides": args.overrides,
            "environment": environment(),
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
