"""Stage 4: INT8 static quantisation (QDQ) calibrated on train frames, with its provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd.pipeline import RunContext, Stage, recipe_fields
from edgekd.quantize.calibration import CalibrationSet
from edgekd.quantize.ort import quantize_static_int8

INT8_FILE = "student.int8.onnx"


def _inputs(ctx: RunContext) -> list[Path]:
    return [ctx.path("export", "onnx_file")]


def calibration_set(ctx: RunContext) -> CalibrationSet:
    """A seeded random subset of the train split, of ``quantize.calibration_samples`` frames."""
    train_set, _, meta = ctx.dataset
    spec = ctx.recipe.quantize
    rng = np.random.default_rng([ctx.recipe.seed, 7])
    count = min(spec.calibration_samples, len(train_set))
    chosen = np.sort(rng.choice(len(train_set), size=count, replace=False))
    return CalibrationSet(
        train_set.x[chosen],
        dataset_fingerprint=meta.fingerprint,
        preprocessing=meta.normalisation.get("description", meta.normalisation.get("type", "none")),
        requested=spec.calibration_samples,
        min_samples=spec.min_calibration_samples,
    )


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    spec = ctx.recipe.quantize
    if not spec.enabled or "int8" not in ctx.target.precisions:
        return {
            "skipped": "quantize.enabled is false" if not spec.enabled else f"{ctx.target.name} has no int8"
        }
    symmetric = ctx.target.backend == "tensorrt"
    info = quantize_static_int8(
        ctx.path("export", "onnx_file"),
        stage_dir / INT8_FILE,
        calibration_set(ctx),
        per_channel=spec.per_channel,
        method=spec.calibration_method,
        symmetric_activations=symmetric,
    )
    return {"int8_onnx_file": str((stage_dir / INT8_FILE).relative_to(ctx.run_dir)), "quantization": info}


STAGE = Stage("quantize", _run, recipe_fields("seed", "data", "quantize", "target"), _inputs)
