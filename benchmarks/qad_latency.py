"""Latency of QAD's INT8 model against post-training INT8 and FP32, side by side, on a quiet machine.

``benchmarks/qad.py`` measures accuracy; its latencies were taken while other jobs ran. This script
answers the latency half of the QAD goal ("at the INT8 artifact's latency"). Per student, one run
folder (digits at 32 px, a ResNet-18 teacher, trained briefly: the graph, not the weights, sets the
latency) is compressed once per :data:`PLAN` entry, keeping each artifact: on ONNX Runtime FP32,
post-training INT8 (``quantize.mode=ptq``, the default), QAD in ORT's own layout (``quantize.mode=qad``)
and QAD in TensorRT's symmetric layout (the jetson target's QDQ model, run here on ORT's CPU: the
layout the README calls several times slower on ORT); on OpenVINO FP32, NNCF's INT8 and QAD (TensorRT's
layout, which OpenVINO targets export). Then every artifact is timed in ``--rounds`` interleaved rounds
(batch 1, one synchronous call, per ``--threads``) and each one's median p50 over the rounds is kept,
so drift on the machine falls on all alike. Ratios are to the same runtime's FP32 artifact. Each ONNX
Runtime row also records the op counts of ORT's optimised graph (Q/DQ nodes left, fused QLinear kernels,
float element-wise ops), and each QAD row the layout it exported.

Run it alone on the machine.

    python benchmarks/qad_latency.py [--students timm:efficientnet_b0 ...] [--rounds 5] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from edgekd import atomic
from edgekd.api import compress
from edgekd.backends import Artifact, get_backend
from edgekd.console import console
from edgekd.profile.latency import measure_latency
from edgekd.report.build import environment

RESULTS = Path(__file__).resolve().parent / "results" / "qad_latency.json"
# Brief training: the artifacts' graphs (and so their latency) do not depend on how well they learned,
# but QAD's parity gate (top-1 agreement of ONNX Runtime with the fake-quant model) does: a student of
# one epoch has near-tied logits, fails the gate and falls back to TensorRT's layout (the row records
# it). Four epochs give it margins.
BRIEF = [
    "data.name=digits",
    "teacher.model=timm:resnet18",
    "teacher.checkpoint=null",
    "teacher.train.epochs=2",
    "distill.method=kd",
    "distill.train.epochs=4",
    "quantize.qad_epochs=1",
    "quantize.calibration_samples=64",
    "quantize.accuracy_samples=64",
    "profile.iterations=5",
    "profile.warmup=1",
]
# (label, target, quantize.mode, which file of the run is kept)
PLAN = [
    ("FP32", "x86-ort", "ptq", "fp32"),
    ("PTQ INT8", "x86-ort", "ptq", "int8"),
    ("QAD INT8, ORT layout", "x86-ort", "qad", "int8"),
    ("QAD INT8, TensorRT layout", "jetson-orin-nano", "qad", "qdq"),
    ("FP32", "x86-openvino", "ptq", "fp32"),
    ("PTQ INT8 (NNCF)", "x86-openvino", "ptq", "int8"),
    ("QAD INT8, TensorRT layout", "x86-openvino", "qad", "int8"),
]


def _keep(run: Path, report: dict[str, Any], which: str, into: Path) -> Artifact:
    """Copy the run's ``which`` file (a compiled artifact's precision, or ``qdq``: the quantize stage's
    QDQ model) with its companions to ``into``; the copy as an Artifact."""
    if which == "qdq":
        source, backend, precision = run / report["quantization"]["int8_onnx_file"], "onnxruntime", "int8"
    else:
        record = next(a for a in report["artifacts"] if a["precision"] == which)
        source, backend, precision = run / record["path"], record["backend"], which
    into.mkdir(parents=True)
    for path in (source, source.with_suffix(".bin")):
        if path.is_file():
            shutil.copy2(path, into / path.name)
    return Artifact(into / source.name, backend, precision, {})


def build(student: str, root: Path) -> list[dict[str, Any]]:
    """Compress ``student`` per :data:`PLAN` in one run folder; the kept artifacts."""
    kept = []
    name = student.split(":")[-1]
    for index, (label, target, mode, which) in enumerate(PLAN):
        sets = [*BRIEF, f"student.model={student}", f"target={target}", f"quantize.mode={mode}"]
        compress(None, [f"runs_dir={root / 'runs'}", f"name={name}", *sets], log=lambda _: None)
        run = root / "runs" / name
        report = json.loads((run / "report.json").read_text())
        artifact = _keep(run, report, which, root / "kept" / f"{name}-{index}")
        runtime = artifact.backend
        entry = {"label": label, "runtime": runtime, "target": target, "artifact": artifact}
        if mode == "qad":  # the layout QAD exported (a failed parity gate falls back to TensorRT's)
            quant = report["quantization"]["quantization"]
            entry["qad"] = {key: quant[key] for key in ("layout", "layout_fallback", "activation_quantisers")}
        if runtime == "onnxruntime":
            entry["ort_optimised_graph"] = optimised_graph_ops(artifact.path, root / "optimised")
        kept.append(entry)
    return kept


def optimised_graph_ops(path: Path, workdir: Path) -> dict[str, int]:
    """What ONNX Runtime's CPU runs: the Q/DQ, fused QLinear and float element-wise nodes of its optimised
    graph of ``path`` (the counts behind QAD's latency against PTQ's)."""
    import onnx
    import onnxruntime as ort

    workdir.mkdir(parents=True, exist_ok=True)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(workdir / f"{path.parent.name}-{path.name}")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    shown = ("QuantizeLinear", "DequantizeLinear", "Sigmoid", "Mul", "Add", "Conv")
    counts = {op: ops.count(op) for op in shown}
    counts.update({op: ops.count(op) for op in sorted(set(ops)) if op.startswith("QLinear") or op == "QGemm"})
    return counts


def time_all(
    kept: list[dict[str, Any]], sample: np.ndarray, threads: int, rounds: int, iterations: int
) -> None:
    """Interleaved rounds over every kept artifact; each one's median p50 over the rounds."""
    runners = [get_backend(k["artifact"].backend).load(k["artifact"], threads=threads) for k in kept]
    p50s: list[list[float]] = [[] for _ in kept]
    for _ in range(rounds):
        for runner, series in zip(runners, p50s, strict=True):
            series.append(measure_latency(runner, sample, 20, iterations)["p50_ms"])
    for entry, series in zip(kept, p50s, strict=True):
        entry.setdefault("p50_ms", {})[threads] = round(statistics.median(series), 4)
        entry.setdefault("rounds_p50_ms", {})[threads] = [round(v, 4) for v in series]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--students", nargs="+", default=["timm:efficientnet_b0", "timm:mobilenetv3_small_100"]
    )
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgekd-qad-latency-") as temp:
        for student in args.students:
            kept = build(student, Path(temp) / student.split(":")[-1])
            sample = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
            for threads in args.threads:
                time_all(kept, sample, threads, args.rounds, args.iterations)
            results[student] = kept
    rows = []
    table = Table(title="p50 ms, batch 1, median of interleaved rounds (ratio to the same runtime's FP32)")
    for column in ("student", "runtime", "artifact", *(f"{t} thread(s)" for t in args.threads)):
        table.add_column(column)
    for student, kept in results.items():
        for entry in kept:
            fp32 = next(k for k in kept if k["runtime"] == entry["runtime"] and k["label"] == "FP32")
            ratios = {t: round(entry["p50_ms"][t] / fp32["p50_ms"][t], 3) for t in args.threads}
            rows.append(
                {
                    "student": student,
                    "runtime": entry["runtime"],
                    "artifact": entry["label"],
                    "made_for_target": entry["target"],
                    "file": entry["artifact"].path.name,
                    "p50_ms": entry["p50_ms"],
                    "ratio_to_fp32": ratios,
                    "rounds_p50_ms": entry["rounds_p50_ms"],
                    **{key: entry[key] for key in ("qad", "ort_optimised_graph") if key in entry},
                }
            )
            cells = [f"{entry['p50_ms'][t]:.3f} ({ratios[t]:.2f}x)" for t in args.threads]
            table.add_row(student, entry["runtime"], entry["label"], *cells)
    console.print(table)
    settings = {
        "training": BRIEF,
        "input": [1, 3, 32, 32],
        "rounds": args.rounds,
        "iterations_per_round": args.iterations,
        "warmup_per_round": 20,
        "threads": args.threads,
    }
    atomic.write_json(
        args.out,
        {"benchmark": "qad_latency", "settings": settings, "rows": rows, "environment": environment()},
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
