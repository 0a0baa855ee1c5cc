"""Stage 6: latency and accuracy of every model and artifact, on the same held-out frames.

Rows: the teacher and the student in PyTorch (the reference), then each compiled artifact of the
target (e.g. student FP32 ONNX and INT8 ONNX on ONNX Runtime). Accuracy is that of the artifact
itself, overall and per SNR, and for each artifact the share of held-out frames on which it predicts
the same class as the PyTorch student it was built from; latency follows the recorded protocol
(warm-up, iterations, batch, threads), model-only and end-to-end with the input normalisation; GPU
runners (TensorRT) are also timed on the device with CUDA events. Artifacts the compile stage could
not build here (TensorRT without a GPU) are listed under ``not_measured`` with the reason.

The thread count is the recipe's ``profile.threads`` (all usable cores when unset), never shrunk
when the machine is busy. Instead the load of other processes is measured while each row and the
whole stage run (/proc/stat busy time minus this process's CPU time, :class:`edgekd.threads.LoadWindow`):
rows carry ``machine_load`` and the stage's ``load`` says whether the machine was loaded, with the
warning the log and the report show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd.backends import get_backend
from edgekd.backends.base import Artifact, resolve_threads
from edgekd.backends.torch import TorchRunner
from edgekd.data import raw_and_preprocess
from edgekd.data.base import ArrayDataset
from edgekd.models import build_model
from edgekd.models.checkpoint import load_weights
from edgekd.pipeline import RunContext, Stage, recipe_fields
from edgekd.profile.accuracy import evaluate_logits, predict
from edgekd.profile.cuda_latency import measure_cuda_latency, supports_cuda_events
from edgekd.profile.latency import current_rss_mb, measure_latency, peak_rss_mb
from edgekd.threads import CpuSample, LoadWindow, load_summary, wait_policy


def _inputs(ctx: RunContext) -> list[Path]:
    artifacts = [ctx.run_dir / name for name in ctx.output("compile", "artifact_files")]  # with IR .bin files
    return [ctx.path("teacher", "model_file"), ctx.path("distill", "model_file"), *artifacts]


EVAL_BATCH = 256


def _evaluation_set(ctx: RunContext) -> ArrayDataset:
    """The held-out split, capped at ``profile.eval_samples`` frames: the same for every row."""
    _, val_set, _ = ctx.dataset
    limit = ctx.recipe.profile.eval_samples or len(val_set)
    snr = None if val_set.snr is None else val_set.snr[:limit]
    return ArrayDataset(val_set.x[:limit], val_set.y[:limit], snr)  # views, no copies


def _measure(
    ctx: RunContext, runner: Any, row: dict[str, Any], reference: np.ndarray | None = None
) -> tuple[dict[str, Any], np.ndarray]:
    """``row`` with the runner's accuracy and latency; and its predicted classes on the evaluation set."""
    spec = ctx.recipe.profile
    evaluation_set = _evaluation_set(ctx)
    logits = predict(runner, evaluation_set.x, batch_size=EVAL_BATCH)
    evaluation = evaluate_logits(logits, evaluation_set.y, groups=evaluation_set.snr, reference=reference)
    raw, preprocess = raw_and_preprocess(
        ctx.dataset[2], np.ascontiguousarray(evaluation_set.x[: spec.batch_size])
    )
    latency = measure_latency(runner, raw, spec.warmup, spec.iterations, preprocess=preprocess)
    if supports_cuda_events(runner):
        model_input = preprocess(raw) if preprocess is not None else raw
        latency["cuda_events"] = measure_cuda_latency(runner, model_input, spec.warmup, spec.iterations)
    ctx.log(f"  {row['name']}: accuracy {evaluation['accuracy']:.4f}, p50 {latency['p50_ms']:.3f} ms")
    return {**row, "accuracy": evaluation, "latency": latency}, logits.argmax(axis=1)


def _memory(rss_before_mb: float | None) -> dict[str, Any]:
    """Resident memory this process gained while loading, evaluating and timing one artifact, and its peak."""
    now = current_rss_mb()
    added = None if now is None or rss_before_mb is None else round(now - rss_before_mb, 2)
    peak = peak_rss_mb()
    return {"rss_added_mb": added, "process_peak_rss_mb": None if peak is None else round(peak, 1)}


def _layer_times(
    ctx: RunContext, backend: Any, artifact: Artifact, threads: int, options: dict[str, Any]
) -> dict[str, Any] | None:
    """The slowest nodes by the runtime's own profiler (same batch, warm-up and iterations as the latency)."""
    spec = ctx.recipe.profile
    raw, preprocess = raw_and_preprocess(
        ctx.dataset[2], np.ascontiguousarray(_evaluation_set(ctx).x[: spec.batch_size])
    )
    batch = preprocess(raw) if preprocess is not None else raw
    return backend.layer_times(
        artifact, batch, runs=spec.iterations, warmup=spec.warmup, threads=threads, **options
    )


def _torch_row(ctx: RunContext, stage: str, role: str, threads: int) -> tuple[dict[str, Any], np.ndarray]:
    """The PyTorch model's row, and its predicted classes on the evaluation set."""
    _, _, meta = ctx.dataset
    name, path = ctx.output(stage, "model"), ctx.path(stage, "model_file")
    model = build_model(name, num_classes=len(meta.classes), in_channels=meta.input_shape[0])
    load_weights(model, path, name)
    row = {
        "name": f"{role} (PyTorch FP32)",
        "role": role,
        "model": name,
        "runtime": "torch",
        "precision": "fp32",
        "size_bytes": path.stat().st_size,
        "params": ctx.output(stage, "params"),
        "flops": ctx.output(stage, "flops"),
    }
    return _measure(ctx, TorchRunner(model, threads=threads), row)


def _with_load(row: dict[str, Any], window: LoadWindow, samples: dict[str, CpuSample | None]) -> None:
    """Record the load of other processes while ``row`` was measured."""
    sample = window.stop()
    samples[row["name"]] = sample
    row["machine_load"] = sample.to_dict()


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    threads = resolve_threads(ctx.recipe.profile.threads)
    stage_window, samples = LoadWindow().start(), {}
    window = LoadWindow().start()
    teacher_row, _ = _torch_row(ctx, "teacher", "teacher", threads)
    _with_load(teacher_row, window, samples)
    window = LoadWindow().start()
    student_row, reference = _torch_row(ctx, "distill", "student", threads)
    _with_load(student_row, window, samples)
    rows = [teacher_row, student_row]
    for record in ctx.output("compile", "artifacts"):
        backend = get_backend(record["backend"])
        artifact = Artifact(
            ctx.run_dir / record["path"], record["backend"], record["precision"], record["metadata"]
        )
        options = {"hint": ctx.recipe.profile.openvino_hint} if backend.hints else {}
        row = {
            "name": f"student ({backend.name} {artifact.precision.upper()})",
            "role": "student",
            "model": ctx.output("distill", "model"),
            "runtime": backend.name,
            "precision": artifact.precision,
            "size_bytes": artifact.metadata.get("size_bytes", artifact.path.stat().st_size),
            "params": ctx.output("distill", "params"),
            "flops": ctx.output("distill", "flops"),
            "artifact": record["path"],
        }
        rss_before = current_rss_mb()
        window = LoadWindow().start()
        runner = backend.load(artifact, threads=threads, **options)
        measured, _ = _measure(ctx, runner, {**row, "runtime_info": runner.info}, reference)
        measured["memory"] = _memory(rss_before)
        measured["layer_times"] = _layer_times(ctx, backend, artifact, threads, options)
        _with_load(measured, window, samples)
        rows.append(measured)
    load = load_summary(stage_window.stop(), samples, threads)
    if load["warning"]:
        ctx.log(f"  warning: {load['warning']}")
    not_measured = [
        {key: item[key] for key in ("name", "backend", "precision", "engine", "profiled", "why")}
        for item in ctx.results["compile"].outputs.get("unbuilt_artifacts", [])
    ]
    for item in not_measured:
        ctx.log(f"  {item['name']}: not measured ({item['why']})")
    return {
        "rows": rows,
        "not_measured": not_measured,
        "threads": threads,
        "omp_wait_policy": wait_policy(),
        "load": load,
        "eval_frames": rows[0]["accuracy"]["n"],
    }


STAGE = Stage("profile", _run, recipe_fields("seed", "data", "profile", "target"), _inputs)
