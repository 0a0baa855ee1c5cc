"""Stage 6: latency and accuracy of every model and artifact, on the same held-out frames.

Rows: the teacher and the student in PyTorch (the reference), then each compiled artifact of the
target (e.g. student FP32 ONNX and INT8 ONNX on ONNX Runtime). Accuracy is that of the artifact
itself, overall and per SNR, and for each artifact the share of held-out frames on which it predicts
the same class as the PyTorch student it was built from; latency follows the recorded protocol
(warm-up, iterations, batch, threads), model-only and end-to-end with the frame normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd.backends import get_backend
from edgekd.backends.base import Artifact, resolve_threads
from edgekd.backends.torch import TorchRunner
from edgekd.data.base import ArrayDataset, normalise_frames
from edgekd.models import build_model
from edgekd.models.checkpoint import load_weights
from edgekd.pipeline import RunContext, Stage, recipe_fields
from edgekd.profile.accuracy import evaluate_classifier, predict
from edgekd.profile.latency import measure_latency


def _inputs(ctx: RunContext) -> list[Path]:
    artifacts = [ctx.run_dir / a["path"] for a in ctx.output("compile", "artifacts")]
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
) -> dict[str, Any]:
    spec = ctx.recipe.profile
    evaluation_set = _evaluation_set(ctx)
    evaluation = evaluate_classifier(
        runner,
        evaluation_set.x,
        evaluation_set.y,
        batch_size=EVAL_BATCH,
        groups=evaluation_set.snr,
        reference=reference,
    )
    sample = np.ascontiguousarray(evaluation_set.x[: spec.batch_size])
    latency = measure_latency(runner, sample, spec.warmup, spec.iterations, preprocess=normalise_frames)
    ctx.log(f"  {row['name']}: accuracy {evaluation['accuracy']:.4f}, p50 {latency['p50_ms']:.3f} ms")
    return {**row, "accuracy": evaluation, "latency": latency}


def _torch_row(ctx: RunContext, stage: str, role: str, threads: int) -> tuple[dict[str, Any], TorchRunner]:
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
    runner = TorchRunner(model, threads=threads)
    return _measure(ctx, runner, row), runner


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    threads = resolve_threads(ctx.recipe.profile.threads)
    teacher_row, _ = _torch_row(ctx, "teacher", "teacher", threads)
    student_row, student_runner = _torch_row(ctx, "distill", "student", threads)
    rows = [teacher_row, student_row]
    reference = predict(student_runner, _evaluation_set(ctx).x, batch_size=EVAL_BATCH).argmax(axis=1)
    backend = get_backend(ctx.target.backend)
    for record in ctx.output("compile", "artifacts"):
        artifact = Artifact(
            ctx.run_dir / record["path"], record["backend"], record["precision"], record["metadata"]
        )
        row = {
            "name": f"student ({backend.name} {artifact.precision.upper()})",
            "role": "student",
            "model": ctx.output("distill", "model"),
            "runtime": backend.name,
            "precision": artifact.precision,
            "size_bytes": artifact.path.stat().st_size,
            "params": ctx.output("distill", "params"),
            "flops": ctx.output("distill", "flops"),
            "artifact": record["path"],
        }
        rows.append(_measure(ctx, backend.load(artifact, threads=threads), row, reference))
    return {"rows": rows, "threads": threads, "eval_frames": rows[0]["accuracy"]["n"]}


STAGE = Stage("profile", _run, recipe_fields("seed", "data", "profile", "target"), _inputs)
