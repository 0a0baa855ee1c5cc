"""edgekd's latency of an OpenVINO IR vs OpenVINO's own ``benchmark_app`` on the same IR and settings.

Both run batch 1 on the CPU with the same performance hint and thread count, one synchronous
request at a time (``benchmark_app -api sync``); edgekd's p50 is compared with benchmark_app's
reported median. Goal: within 5 %. benchmark_app's median is the runtime's own per-request timing
(``InferRequest.latency``), which leaves out the Python call around it; edgekd's p50 is wall-clock
around ``runner.run`` (what an application sees), so the runtime-internal p50 of the same runner's
calls is reported too: a gap between the two is Python-side overhead, visible only on tiny models.
Each model and thread count runs ``--rounds`` interleaved rounds (edgekd, its runtime-internal
figure, benchmark_app) and keeps each tool's median over the rounds, so drift on a shared machine
falls on both tools alike.
By default the IRs are those of :data:`MODELS` (random weights) at FP32, FP16 and INT8 (NNCF,
calibrated on random frames); pass --ir to measure your own (dynamic or batch-1 input).

Prints a table and writes benchmarks/results/latency_fidelity.json.
    python benchmarks/latency_fidelity.py [--ir model.xml ...] [--threads 1 2] [--iterations 2000]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.table import Table

from edgekd import atomic
from edgekd.backends import Artifact, get_backend
from edgekd.backends.base import Runner, default_threads
from edgekd.console import console
from edgekd.profile.latency import measure_latency
from edgekd.report.build import environment

RESULTS = Path(__file__).resolve().parent / "results" / "latency_fidelity.json"
GOAL = 0.05
# label -> (model, classes, input shape): two tiny students, where a fixed per-call cost in Python is
# a visible share of a request, and a 224x224 ResNet-18, where it is not
MODELS = {
    "radio kd-cnn": ("edgekd:kd-cnn", 11, (2, 128)),
    "mobilenetv3_small_100 32x32": ("timm:mobilenetv3_small_100", 10, (3, 32, 32)),
    "resnet18 224x224": ("timm:resnet18", 1000, (3, 224, 224)),
}
_MEDIAN = re.compile(r"Median:\s*([0-9.]+)\s*(ms|us)")


def benchmark_app() -> str:
    """The benchmark_app installed with openvino (beside this Python, else on PATH)."""
    beside = Path(sys.executable).parent / "benchmark_app"
    found = str(beside) if beside.is_file() else shutil.which("benchmark_app")
    if found is None:
        raise SystemExit("benchmark_app not found; it ships with openvino: pip install -e '.[openvino]'")
    return found


def student_irs(workdir: Path) -> list[tuple[str, Artifact]]:
    """Each default model's IR at fp32, fp16 and int8 (random weights; latency does not depend on them)."""
    import torch

    from edgekd.export import export_onnx
    from edgekd.models import build_model
    from edgekd.quantize import CalibrationSet

    backend = get_backend("openvino")
    irs = []
    for label, (name, classes, shape) in MODELS.items():
        torch.manual_seed(0)
        folder = workdir / label.replace(" ", "-")
        onnx_path = folder / "model.onnx"
        export_onnx(build_model(name, num_classes=classes, in_channels=shape[0]), shape, onnx_path)
        frames = np.random.default_rng(0).standard_normal((64, *shape)).astype(np.float32)
        calib = CalibrationSet(frames, "random", "none", 64, 16)
        for precision in ("fp32", "fp16", "int8"):
            irs.append(
                (label, backend.compile(onnx_path, folder, precision, calib if precision == "int8" else None))
            )
    return irs


def static_copy(artifact: Artifact, workdir: Path) -> tuple[Artifact, list[int]]:
    """The IR reshaped to a static batch of 1 (saved as is otherwise), and that input shape.

    With a dynamic input benchmark_app runs in "full mode" (input filling inside the timed loop), so
    both tools measure this static copy instead.
    """
    import openvino as ov

    model = ov.Core().read_model(str(artifact.path))
    shape = [1] + [dim.get_length() for dim in list(model.input(0).get_partial_shape())[1:]]
    model.reshape(shape)
    target = workdir / "static" / artifact.path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(target), compress_to_fp16=False)
    return Artifact(target, artifact.backend, artifact.precision, {}), shape


def run_benchmark_app(xml: Path, info: dict, iterations: int, workdir: Path) -> tuple[float, str]:
    """benchmark_app's median latency (ms) with the CPU properties edgekd's runner compiled with.

    The properties go through ``-load_config`` (benchmark_app refuses ``-nthreads`` next to ``-hint``).
    """
    properties = {"PERFORMANCE_HINT": info["hint"].upper(), "INFERENCE_NUM_THREADS": str(info["threads"])}
    if info.get("inference_precision_source") == "set to f32":
        properties["INFERENCE_PRECISION_HINT"] = "f32"
    config = workdir / "benchmark_app_config.json"
    config.write_text(json.dumps({"CPU": properties}))
    command = [
        benchmark_app(), "-m", str(xml), "-d", "CPU", "-api", "sync", "-nireq", "1",
        "-load_config", str(config), "-niter", str(iterations),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    match = _MEDIAN.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise SystemExit(
            f"benchmark_app failed ({result.returncode}): {(result.stderr or result.stdout)[-2000:]}"
        )
    median_ms = float(match.group(1)) / (1000.0 if match.group(2) == "us" else 1.0)
    return median_ms, " ".join([*command[1:-3], json.dumps({"CPU": properties}), *command[-2:]])


def iterations_for(runner: Runner, sample: np.ndarray, most: int, seconds: float) -> int:
    """``most`` timed calls, or fewer (at least 100) where that many would take over ``seconds``."""
    estimate = measure_latency(runner, sample, 5, 20)["p50_ms"] / 1e3
    return int(min(most, max(100, seconds / estimate)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ir", type=Path, nargs="*", help="IR .xml files (default: MODELS' IRs)")
    parser.add_argument("--threads", type=int, nargs="*", default=None, help="default: all cores")
    parser.add_argument("--hint", choices=("latency", "throughput"), default="latency")
    parser.add_argument("--iterations", type=int, default=2000, help="timed calls, at most (see --seconds)")
    parser.add_argument("--seconds", type=float, default=3.0, help="fewer iterations past this time each")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both tools")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    backend = get_backend("openvino")
    with tempfile.TemporaryDirectory(prefix="edgekd-fidelity-") as workdir:
        artifacts = (
            [(path.name, Artifact(path, "openvino", "fp32", {})) for path in args.ir]
            if args.ir
            else student_irs(Path(workdir))
        )
        rows = []
        for label, original in artifacts:
            artifact, shape = static_copy(original, Path(workdir) / label.replace(" ", "-"))
            sample = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            for threads in args.threads or [default_threads()]:
                runner = backend.load(artifact, threads=threads, hint=args.hint)
                iterations = iterations_for(runner, sample, args.iterations, args.seconds)
                ours_p50, internal_p50_rounds, theirs_median = [], [], []
                for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both tools
                    ours = measure_latency(runner, sample, args.warmup, iterations)
                    ours_p50.append(ours["p50_ms"])
                    internal = []
                    for _ in range(iterations):
                        runner.run(sample)
                        internal.append(runner.runtime_latency_ms)
                    internal_p50_rounds.append(float(np.median(internal)))
                    median, command = run_benchmark_app(artifact.path, runner.info, iterations, Path(workdir))
                    theirs_median.append(median)
                ours = {**ours, "p50_ms": float(np.median(ours_p50))}
                internal_p50, theirs = float(np.median(internal_p50_rounds)), float(np.median(theirs_median))
                diff = ours["p50_ms"] / theirs - 1.0
                rows.append(
                    {
                        "model": label,
                        "ir": original.path.name if not args.ir else str(original.path),
                        "measured_as": "static batch-1 copy (both tools)",
                        "precision": None if args.ir else artifact.precision,
                        "threads": threads,
                        "hint": args.hint,
                        "edgekd_p50_ms": round(ours["p50_ms"], 4),
                        "benchmark_app_median_ms": theirs,
                        "relative_diff": round(diff, 4),
                        "edgekd_runtime_internal_p50_ms": round(internal_p50, 4),
                        "runtime_internal_relative_diff": round(internal_p50 / theirs - 1.0, 4),
                        "within_goal": abs(diff) <= GOAL,
                        "edgekd_protocol": {k: ours[k] for k in ("warmup", "iterations", "batch", "threads")},
                        "rounds": {
                            "edgekd_p50_ms": ours_p50,
                            "edgekd_runtime_internal_p50_ms": internal_p50_rounds,
                            "benchmark_app_median_ms": theirs_median,
                            "kept": "the median of the rounds, per tool",
                        },
                        "runtime_info": runner.info,
                        "benchmark_app_command": command,
                    }
                )
    table = Table(title=f"edgekd vs benchmark_app (batch 1, hint {args.hint}, sync)")
    columns = ("model", "precision", "threads", "edgekd p50 ms", "benchmark_app median ms", "diff", "≤5 %")
    for column in (*columns, "runtime-internal p50 ms", "diff"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["model"], row["precision"] or "-", str(row["threads"]), f"{row['edgekd_p50_ms']:.4f}",
            f"{row['benchmark_app_median_ms']:.4f}", f"{100 * row['relative_diff']:+.1f} %",
            "yes" if row["within_goal"] else "no", f"{row['edgekd_runtime_internal_p50_ms']:.4f}",
            f"{100 * row['runtime_internal_relative_diff']:+.1f} %",
        )  # fmt: skip
    console.print(table)
    atomic.write_json(args.out, {"goal": GOAL, "environment": environment(), "rows": rows})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
