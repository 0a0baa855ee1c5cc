"""Stage 6: latency, accuracy and peak memory of every model and artifact, on the same held-out frames.

Rows: the teacher and the student in PyTorch (the reference), then each compiled artifact of the
target (e.g. student FP32 ONNX and INT8 ONNX on ONNX Runtime). A teacher given as ONNX is measured
through ONNX Runtime; ``edgekd deploy`` has no teacher row, and a model deployed as an ONNX file has
no PyTorch row: its artifacts' agreement is with that file run by ONNX Runtime in FP32. Accuracy is
that of the artifact itself, overall and per SNR, and for each artifact the share of held-out frames on
which it predicts the same class as the FP32 model it was built from; latency follows the recorded protocol
(warm-up, iterations, batch, threads), model-only and end-to-end with the input normalisation; GPU
runners (TensorRT) are also timed on the device with CUDA events. Each artifact's ``memory`` is the
resident memory loading it and its timed runs added (:class:`edgekd.profile.latency.MemoryWindow`:
VmRSS before loading vs the reset VmHWM peak; the runtime's own arena figure where it reports one),
what a firmware engineer sizes RAM from; the bundle stage's deployment decision reads these rows.
Artifacts the compile stage could
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
from edgekd.profile.latency import MemoryWindow, measure_latency
from edgekd.stages.model_import import load_student, student_stage
from edgekd.threads import CpuSample, LoadWindow, load_summary, wait_policy


def _inputs(ctx: RunContext) -> list[Path]:
    artifacts = [ctx.run_dir / name for name in ctx.output("compile", "artifact_files")]  # with IR .bin files
    teacher = [ctx.path("teacher", "model_file")] if "teacher" in ctx.results else []
    naive = [  # detection: the naive full-INT8 models measured beside the INT8 artifact
        ctx.run_dir / name
        for name in (
            *ctx.results["compile"].outputs.get("naive_int8_files", []),
            *([ctx.results["quantize"].outputs["naive_int8_onnx_file"]] if _has_naive_onnx(ctx) else []),
        )
    ]
    return [*teacher, ctx.path(student_stage(ctx), "model_file"), *artifacts, *naive]


def _has_naive_onnx(ctx: RunContext) -> bool:
    return "quantize" in ctx.results and "naive_int8_onnx_file" in ctx.results["quantize"].outputs


EVAL_BATCH = 256


def _evaluation_set(ctx: RunContext) -> ArrayDataset:
    """The held-out split, capped at ``profile.eval_samples`` frames: the same for every row."""
    _, val_set, _ = ctx.dataset
    limit = ctx.recipe.profile.eval_samples or len(val_set)
    snr = None if val_set.snr is None else val_set.snr[:limit]
    return ArrayDataset(val_set.x[:limit], val_set.y[:limit], snr)  # views, no copies


def _measure(
    ctx: RunContext,
    runner: Any,
    row: dict[str, Any],
    reference: np.ndarray | None = None,
    memory: MemoryWindow | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """``row`` with the runner's latency and accuracy (and, given ``memory`` started before the runner was
    loaded, the resident memory loading and the timed runs added); and its predicted classes.

    The timed runs come first so that the memory peak is that of the profile batch, not of the larger
    batches accuracy is evaluated in.
    """
    spec = ctx.recipe.profile
    evaluation_set = _evaluation_set(ctx)
    raw, preprocess = raw_and_preprocess(
        ctx.dataset[2], np.ascontiguousarray(evaluation_set.x[: spec.batch_size])
    )
    latency = measure_latency(runner, raw, spec.warmup, spec.iterations, preprocess=preprocess)
    if supports_cuda_events(runner):
        model_input = preprocess(raw) if preprocess is not None else raw
        latency["cuda_events"] = measure_cuda_latency(runner, model_input, spec.warmup, spec.iterations)
    measured = {**row}
    if memory is not None:
        measured["memory"] = memory.stop(runner)
    logits = predict(runner, evaluation_set.x, batch_size=EVAL_BATCH)
    evaluation = evaluate_logits(
        logits, evaluation_set.y, evaluation_set.snr, reference, group_labels=ctx.dataset[2].group_labels
    )
    peak = (measured.get("memory") or {}).get("peak_added_mb")
    ctx.log(
        f"  {row['name']}: accuracy {evaluation['accuracy']:.4f}, p50 {latency['p50_ms']:.3f} ms"
        + ("" if peak is None else f", peak memory +{peak:.1f} MB")
    )
    return {**measured, "accuracy": evaluation, "latency": latency}, logits.argmax(axis=1)


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


def _teacher_model(ctx: RunContext) -> Any:
    _, _, meta = ctx.dataset
    spec, name = ctx.recipe.teacher, ctx.output("teacher", "model")
    model = build_model(
        name,
        num_classes=len(meta.classes),
        in_channels=meta.input_shape[0],
        role="teacher",
        input_shape=tuple(meta.input_shape),
        kwargs=spec.kwargs,
        hint_layers=spec.hint_layers,
    )
    load_weights(model, ctx.path("teacher", "model_file"), name)
    return model


def _onnx_teacher_row(ctx: RunContext, threads: int) -> tuple[dict[str, Any], np.ndarray]:
    """An ONNX teacher (``onnx:FILE``): its copy measured through ONNX Runtime, FP32."""
    path = ctx.path("teacher", "model_file")
    backend = get_backend("onnxruntime")
    runner = backend.load(Artifact(path, "onnxruntime", "fp32", {}), threads=threads)
    row = {
        "name": "teacher (onnxruntime FP32, user ONNX)",
        "role": "teacher",
        "model": ctx.output("teacher", "model"),
        "runtime": "onnxruntime",
        "precision": "fp32",
        "size_bytes": path.stat().st_size,
        "params": ctx.output("teacher", "params"),
        "flops": ctx.results["teacher"].outputs.get("flops"),
        "runtime_info": runner.info,
    }
    return _measure(ctx, runner, row)


def _onnx_reference(ctx: RunContext, threads: int) -> np.ndarray:
    """Predicted classes of a deployed ONNX model (FP32, ONNX Runtime): what each artifact must agree with."""
    path = ctx.path("export", "onnx_file")
    runner = get_backend("onnxruntime").load(Artifact(path, "onnxruntime", "fp32", {}), threads=threads)
    return predict(runner, _evaluation_set(ctx).x, batch_size=EVAL_BATCH).argmax(axis=1)


def _torch_row(ctx: RunContext, stage: str, role: str, threads: int) -> tuple[dict[str, Any], np.ndarray]:
    """The PyTorch model's row, and its predicted classes on the evaluation set."""
    name, path = ctx.output(stage, "model"), ctx.path(stage, "model_file")
    model = _teacher_model(ctx) if role == "teacher" else load_student(ctx)
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


def _artifact_row(
    ctx: RunContext, record: dict[str, Any], stage: str
) -> tuple[Any, Artifact, dict[str, Any], dict[str, Any]]:
    """A compiled artifact's backend, :class:`Artifact`, load options and row (before measuring)."""
    backend = get_backend(record["backend"])
    artifact = Artifact(
        ctx.run_dir / record["path"], record["backend"], record["precision"], record["metadata"]
    )
    options = {"hint": ctx.recipe.profile.openvino_hint} if backend.hints else {}
    row = {
        "name": f"student ({backend.name} {artifact.precision.upper()})",
        "role": "student",
        "model": ctx.output(stage, "model"),
        "runtime": backend.name,
        "precision": artifact.precision,
        "size_bytes": artifact.metadata.get("size_bytes", artifact.path.stat().st_size),
        "params": ctx.output(stage, "params"),
        "flops": ctx.output(stage, "flops"),
        "artifact": record["path"],
    }
    return backend, artifact, options, row


def _stage_summary(
    ctx: RunContext, stage_window: LoadWindow, samples: dict[str, CpuSample | None], threads: int
) -> dict[str, Any]:
    """The stage's ``not_measured``, ``threads``, ``omp_wait_policy`` and ``load`` (warnings logged)."""
    load = load_summary(stage_window.stop(), samples, threads)
    if load["warning"]:
        ctx.log(f"  warning: {load['warning']}")
    not_measured = [
        {key: item[key] for key in ("name", "backend", "precision", "engine", "profiled", "why")}
        for item in ctx.results["compile"].outputs.get("unbuilt_artifacts", [])
    ]
    for item in not_measured:
        ctx.log(f"  {item['name']}: not measured ({item['why']})")
    return {"not_measured": not_measured, "threads": threads, "omp_wait_policy": wait_policy(), "load": load}


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    if ctx.task == "detection":
        return _run_detection(ctx)
    threads = resolve_threads(ctx.recipe.profile.threads)
    stage_window, samples = LoadWindow().start(), {}
    rows: list[dict[str, Any]] = []
    if "teacher" in ctx.results:  # deploy has no teacher
        window = LoadWindow().start()
        if str(ctx.output("teacher", "model_file")).endswith(".onnx"):
            teacher_row, _ = _onnx_teacher_row(ctx, threads)
        else:
            teacher_row, _ = _torch_row(ctx, "teacher", "teacher", threads)
        _with_load(teacher_row, window, samples)
        rows.append(teacher_row)
    stage = student_stage(ctx)
    if ctx.results[stage].outputs.get("format") == "onnx":
        # The user's ONNX file is the FP32 model: artifacts agree (or not) with its predictions.
        reference, reference_name = _onnx_reference(ctx, threads), "the FP32 ONNX model (ONNX Runtime)"
    else:
        window = LoadWindow().start()
        student_row, reference = _torch_row(ctx, stage, "student", threads)
        _with_load(student_row, window, samples)
        rows.append(student_row)
        reference_name = "the FP32 PyTorch model"
    for record in ctx.output("compile", "artifacts"):
        backend, artifact, options, row = _artifact_row(ctx, record, stage)
        window, memory = LoadWindow().start(), MemoryWindow().start()
        runner = backend.load(artifact, threads=threads, **options)
        measured, _ = _measure(ctx, runner, {**row, "runtime_info": runner.info}, reference, memory)
        measured["layer_times"] = _layer_times(ctx, backend, artifact, threads, options)
        _with_load(measured, window, samples)
        rows.append(measured)
    summary = _stage_summary(ctx, stage_window, samples, threads)
    return {
        "rows": rows,
        **summary,
        "eval_frames": len(reference),
        "agreement_reference": reference_name,
    }


def _detection_set(ctx: RunContext) -> Any:
    """The held-out detection images, capped at ``profile.eval_samples``: the same for every row."""
    _, val_set, _ = ctx.dataset
    limit = min(ctx.recipe.profile.eval_samples or len(val_set), len(val_set))
    return val_set if limit == len(val_set) else val_set.subset(np.arange(limit))


def _detection_measure(
    ctx: RunContext,
    runner: Any,
    detector: Any,
    row: dict[str, Any],
    reference: list[Any] | None,
    memory: MemoryWindow | None = None,
) -> tuple[dict[str, Any], list[Any]]:
    """``row`` with latency (``runner.run``, the model only) and the mAP record of ``detector``."""
    from edgekd.detection.evaluate import evaluate_detector

    spec = ctx.recipe.profile
    data = _detection_set(ctx)
    batch = np.ascontiguousarray(data.images[: spec.batch_size])
    latency = measure_latency(runner, batch, spec.warmup, spec.iterations)
    measured = {**row}
    if memory is not None:
        measured["memory"] = memory.stop(runner)
    evaluation, detections = evaluate_detector(detector, data, reference)
    agreement = evaluation["agreement"]
    ctx.log(
        f"  {row['name']}: mAP {_fmt(evaluation['map'])}, mAP50 {_fmt(evaluation['map50'])}"
        + ("" if agreement is None else f", agreement mAP {agreement:.3f}")
        + f", p50 {latency['p50_ms']:.3f} ms"
    )
    return {**measured, "accuracy": evaluation, "latency": latency}, detections


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _naive_int8(
    ctx: RunContext, record: dict[str, Any], threads: int, reference: list[Any]
) -> dict[str, Any] | None:
    """The naive full-INT8 model beside a detection INT8 artifact: its mAP, agreement and latency."""
    from edgekd.detection.evaluate import artifact_detector, evaluate_detector

    if record["precision"] != "int8":
        return None
    if record["backend"] == "onnxruntime":
        name = ctx.results["quantize"].outputs.get("naive_int8_onnx_file")
    else:
        name = ((record.get("metadata") or {}).get("quantization") or {}).get("naive", {}).get("file")
    if name is None:
        return None
    path = ctx.run_dir / name
    detector = artifact_detector(path, record["backend"], threads)
    evaluation, _ = evaluate_detector(detector, _detection_set(ctx), reference)
    spec = ctx.recipe.profile
    batch = np.ascontiguousarray(_detection_set(ctx).images[: spec.batch_size])
    runner = get_backend(record["backend"]).load(
        Artifact(path, record["backend"], "int8", {}), threads=threads
    )
    latency = measure_latency(runner, batch, spec.warmup, spec.iterations)
    ctx.log(
        f"    naive full INT8 (no DETR rules): mAP {_fmt(evaluation['map'])}, agreement mAP "
        f"{_fmt(evaluation['agreement'])}, p50 {latency['p50_ms']:.3f} ms"
    )
    return {
        "file": name,
        "rules": "naive",
        "map": evaluation["map"],
        "map50": evaluation["map50"],
        "agreement": evaluation["agreement"],
        "p50_ms": latency["p50_ms"],
    }


def _run_detection(ctx: RunContext) -> dict[str, Any]:
    """A detection run: the same rows as for classifiers, with mAP@[.5:.95], mAP@.5 and agreement mAP
    (:mod:`edgekd.detection.evaluate`) instead of top-1; INT8 rows also carry the naive full-INT8
    model's numbers (``naive_int8``), to show what the DETR rules buy."""
    from edgekd.detection.evaluate import TorchDetector, artifact_detector
    from edgekd.stages.teacher import trained_teacher

    threads = resolve_threads(ctx.recipe.profile.threads)
    stage_window, samples = LoadWindow().start(), {}
    rows: list[dict[str, Any]] = []
    stage = student_stage(ctx)
    if "teacher" in ctx.results:
        window = LoadWindow().start()
        runner = TorchDetector(trained_teacher(ctx), threads)
        path = ctx.path("teacher", "model_file")
        row = _detection_torch_row(ctx, "teacher", "teacher", path)
        teacher_row, _ = _detection_measure(ctx, runner, runner, row, None)
        _with_load(teacher_row, window, samples)
        rows.append(teacher_row)
    window = LoadWindow().start()
    runner = TorchDetector(load_student(ctx), threads)
    row = _detection_torch_row(ctx, stage, "student", ctx.path(stage, "model_file"))
    student_row, reference = _detection_measure(ctx, runner, runner, row, None)
    student_row["accuracy"].update(agreement=1.0, agreement_map50=1.0)  # the reference itself
    _with_load(student_row, window, samples)
    rows.append(student_row)
    for record in ctx.output("compile", "artifacts"):
        backend, artifact, options, row = _artifact_row(ctx, record, stage)
        window, memory = LoadWindow().start(), MemoryWindow().start()
        runner = backend.load(artifact, threads=threads, **options)
        detector = artifact_detector(artifact.path, record["backend"], threads)
        measured, _ = _detection_measure(
            ctx, runner, detector, {**row, "runtime_info": runner.info}, reference, memory
        )
        measured["naive_int8"] = _naive_int8(ctx, record, threads, reference)
        measured["layer_times"] = _layer_times_detection(ctx, backend, artifact, threads, options)
        _with_load(measured, window, samples)
        rows.append(measured)
    summary = _stage_summary(ctx, stage_window, samples, threads)
    return {
        "task": "detection",
        "rows": rows,
        **summary,
        "eval_frames": len(reference),
        "agreement_reference": "the FP32 PyTorch model's detections scoring >= 0.5",
    }


def _detection_torch_row(ctx: RunContext, stage: str, role: str, path: Path) -> dict[str, Any]:
    return {
        "name": f"{role} (PyTorch FP32)",
        "role": role,
        "model": ctx.output(stage, "model"),
        "runtime": "torch",
        "precision": "fp32",
        "size_bytes": path.stat().st_size,
        "params": ctx.results[stage].outputs.get("params"),
        "flops": ctx.results[stage].outputs.get("flops"),
    }


def _layer_times_detection(
    ctx: RunContext, backend: Any, artifact: Artifact, threads: int, options: dict[str, Any]
) -> dict[str, Any] | None:
    spec = ctx.recipe.profile
    batch = np.ascontiguousarray(_detection_set(ctx).images[: spec.batch_size])
    return backend.layer_times(
        artifact, batch, runs=spec.iterations, warmup=spec.warmup, threads=threads, **options
    )


STAGE = Stage("profile", _run, recipe_fields("seed", "data", "profile", "target"), _inputs)
