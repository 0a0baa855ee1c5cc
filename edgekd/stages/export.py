"""Stage 3: export the student to ONNX and check ONNX Runtime against PyTorch on held-out frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd.export.onnx import check_finite_weights, check_parity, export_onnx
from edgekd.models import build_model
from edgekd.models.checkpoint import load_weights
from edgekd.pipeline import RunContext, Stage, recipe_fields

ONNX_FILE = "student.onnx"


def _inputs(ctx: RunContext) -> list[Path]:
    return [ctx.path("distill", "model_file")]


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    _, val_set, meta = ctx.dataset
    spec = ctx.recipe.export
    name = ctx.output("distill", "model")
    student = build_model(name, num_classes=len(meta.classes), in_channels=meta.input_shape[0])
    load_weights(student, ctx.path("distill", "model_file"), name)
    check_finite_weights(student, ctx.path("distill", "model_file"))  # a diverged training: say so here
    student.eval()
    info = export_onnx(student, meta.input_shape, stage_dir / ONNX_FILE, opset=spec.opset)
    parity = check_parity(student, stage_dir / ONNX_FILE, val_set.x[: spec.parity_samples], spec.tolerance)
    return {
        "onnx_file": str((stage_dir / ONNX_FILE).relative_to(ctx.run_dir)),
        "export": info,
        "parity": parity,
    }


STAGE = Stage("export", _run, recipe_fields("export"), _inputs)
