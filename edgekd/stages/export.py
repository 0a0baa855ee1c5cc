"""Stage 3: export the student to ONNX and check ONNX Runtime against PyTorch on held-out frames.

The student is the distill stage's, or in ``edgekd deploy`` the model stage's; a model deployed as an
ONNX file is passed on as it is (the model stage checked and copied it): no re-export, no parity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd.export.onnx import check_finite_weights, check_parity, export_onnx
from edgekd.pipeline import RunContext, Stage, recipe_fields
from edgekd.stages.model_import import load_student, student_stage

ONNX_FILE = "student.onnx"


def _inputs(ctx: RunContext) -> list[Path]:
    return [ctx.path(student_stage(ctx), "model_file")]


def _passthrough(ctx: RunContext) -> dict[str, Any]:
    """The user's ONNX file (the model stage's copy), recorded as the export."""
    outputs = ctx.results["model"].outputs
    info = outputs["onnx"]
    return {
        "onnx_file": outputs["onnx_file"],
        "export": {
            "opset": info["opset"],
            "inputs": info["inputs"],
            "outputs": info["outputs"],
            "size_bytes": ctx.path("model", "onnx_file").stat().st_size,
            "exporter": "user ONNX file",
            "model_class": None,
            "dynamic_batch_added": info["dynamic_batch_added"],
        },
        "parity": None,
    }


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    stage = student_stage(ctx)
    if ctx.results[stage].outputs.get("format") == "onnx":
        ctx.log("  user ONNX file: passed through (no re-export)")
        return _passthrough(ctx)
    _, val_set, meta = ctx.dataset
    spec = ctx.recipe.export
    student = load_student(ctx)
    check_finite_weights(student, ctx.path(stage, "model_file"))  # a diverged training: say so here
    if ctx.task == "detection":
        return _run_detection(ctx, stage_dir, student, val_set, meta)
    info = export_onnx(student, meta.input_shape, stage_dir / ONNX_FILE, opset=spec.opset, dynamo=spec.dynamo)
    parity = check_parity(student, stage_dir / ONNX_FILE, val_set.x[: spec.parity_samples], spec.tolerance)
    return {
        "onnx_file": str((stage_dir / ONNX_FILE).relative_to(ctx.run_dir)),
        "export": info,
        "parity": parity,
    }


def _run_detection(ctx: RunContext, stage_dir: Path, student: Any, val_set: Any, meta: Any) -> dict[str, Any]:
    """A detector: ONNX with ``logits`` and ``boxes`` outputs, parity on both (held-out images)."""
    from edgekd.export.detection import check_detection_parity, export_detector

    spec = ctx.recipe.export
    target = stage_dir / ONNX_FILE
    info = export_detector(student, tuple(meta.input_shape), target, opset=spec.opset, dynamo=spec.dynamo)
    parity = check_detection_parity(student, target, val_set.images[: spec.parity_samples], spec.tolerance)
    ctx.log(
        f"  parity: max |diff| logits {parity['outputs']['logits']['max_abs_diff']:.2g}, boxes "
        f"{parity['outputs']['boxes']['max_abs_diff']:.2g} on {parity['samples']} held-out images"
    )
    return {"onnx_file": str(target.relative_to(ctx.run_dir)), "export": info, "parity": parity}


STAGE = Stage("export", _run, recipe_fields("export"), _inputs)
