"""Stage 4: INT8 static quantisation (QDQ) calibrated on train frames, with its provenance.

With ``quantize.max_accuracy_drop`` the most sensitive nodes stay in float until the top-1 drop on
``quantize.accuracy_samples`` train frames (never calibration frames) fits. Ops the quantiser has no
INT8 form of (GRU, LSTM, Einsum, ...) stay in float too: ``quantization.kept_in_float`` counts them.
Targets whose backend quantises INT8 itself (OpenVINO: NNCF on the float model, in the compile
stage) skip this stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd.backends import BACKENDS
from edgekd.pipeline import RunContext, Stage, recipe_fields
from edgekd.quantize.budget import AccuracyBudget
from edgekd.quantize.calibration import CalibrationSet
from edgekd.quantize.ort import quantize_static_int8
from edgekd.quantize.ort_accuracy import quantize_within_budget

INT8_FILE = "student.int8.onnx"


def _inputs(ctx: RunContext) -> list[Path]:
    return [ctx.path("export", "onnx_file")]


def _calibration_indices(ctx: RunContext) -> np.ndarray:
    train_set, _, _ = ctx.dataset
    rng = np.random.default_rng([ctx.recipe.seed, 7])
    count = min(ctx.recipe.quantize.calibration_samples, len(train_set))
    return np.sort(rng.choice(len(train_set), size=count, replace=False))


def calibration_set(ctx: RunContext) -> CalibrationSet:
    """A seeded random subset of the train split, of ``quantize.calibration_samples`` frames."""
    train_set, _, meta = ctx.dataset
    spec = ctx.recipe.quantize
    chosen = _calibration_indices(ctx)
    return CalibrationSet(
        train_set.x[chosen],
        dataset_fingerprint=meta.fingerprint,
        preprocessing=meta.normalisation.get("description", meta.normalisation.get("type", "none")),
        requested=spec.calibration_samples,
        min_samples=spec.min_calibration_samples,
    )


def accuracy_budget(ctx: RunContext) -> AccuracyBudget | None:
    """``quantize.accuracy_samples`` seeded train frames not used for calibration; None without a budget."""
    spec = ctx.recipe.quantize
    if spec.max_accuracy_drop is None:
        return None
    train_set, _, meta = ctx.dataset
    remaining = np.setdiff1d(np.arange(len(train_set)), _calibration_indices(ctx))
    rng = np.random.default_rng([ctx.recipe.seed, 8])
    chosen = np.sort(rng.choice(remaining, size=min(spec.accuracy_samples, len(remaining)), replace=False))
    provenance = {
        "split": "train, excluding the calibration frames",
        "requested": spec.accuracy_samples,
        "dataset_fingerprint": meta.fingerprint,
    }
    return AccuracyBudget(spec.max_accuracy_drop, train_set.x[chosen], train_set.y[chosen], provenance)


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    spec = ctx.recipe.quantize
    if not spec.enabled or "int8" not in ctx.target.precisions:
        return {
            "skipped": "quantize.enabled is false" if not spec.enabled else f"{ctx.target.name} has no int8"
        }
    if BACKENDS.get(ctx.target.backend).quantizes_itself:
        return {
            "skipped": f"backend {ctx.target.backend!r} of {ctx.target.name} quantises INT8 itself from the "
            f"float model in the compile stage; no QDQ model is made"
        }
    options = {
        "per_channel": spec.per_channel,
        "method": spec.calibration_method,
        # TensorRT's explicit quantisation: INT8 zero points 0, biases in float (no INT32 DequantizeLinear).
        "symmetric_activations": ctx.target.backend == "tensorrt",
        "quantize_bias": ctx.target.backend != "tensorrt",
    }
    source, target, calib = ctx.path("export", "onnx_file"), stage_dir / INT8_FILE, calibration_set(ctx)
    budget = accuracy_budget(ctx)
    if budget is None:
        info = quantize_static_int8(source, target, calib, **options)
    else:
        info = quantize_within_budget(source, target, calib, budget, **options)
        control = info["accuracy_control"]
        ctx.log(
            f"  INT8 drop {control['drop_before']:.4f} -> {control['drop_after']:.4f} "
            f"(budget {budget.max_drop}) after {control['attempts']} attempt(s), "
            f"{len(control['excluded_nodes'])} node(s) in float: {control['stopped']}"
        )
        if not control["int8_left"]:
            target.unlink()
            why = (
                f"quantize.max_accuracy_drop={budget.max_drop} is met only with every node in float, so "
                "there is no INT8 model; deploy FP32 or raise quantize.max_accuracy_drop"
            )
            ctx.log(f"  {why}")
            return {"skipped": why, "quantization": info}
    log_kept_in_float(ctx, info.get("kept_in_float"))
    return {"int8_onnx_file": str((stage_dir / INT8_FILE).relative_to(ctx.run_dir)), "quantization": info}


def log_kept_in_float(ctx: RunContext, counts: dict[str, int] | None) -> None:
    """Log the op types an INT8 quantiser left in float (ops its runtime has no INT8 form of)."""
    if counts:
        ctx.log(f"  kept in float: {', '.join(f'{op} x{count}' for op, count in counts.items())}")


STAGE = Stage("quantize", _run, recipe_fields("seed", "data", "quantize", "target"), _inputs)
