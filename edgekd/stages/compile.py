"""Stage 5: compile an artifact per precision of the target with its backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd.backends import get_backend
from edgekd.pipeline import RunContext, Stage, recipe_fields


def _onnx_for(ctx: RunContext, precision: str) -> Path | None:
    """The ONNX a precision is compiled from: the QDQ model for int8, the float export otherwise."""
    if precision == "int8":
        outputs = ctx.results["quantize"].outputs
        return ctx.run_dir / outputs["int8_onnx_file"] if "int8_onnx_file" in outputs else None
    return ctx.path("export", "onnx_file")


def _inputs(ctx: RunContext) -> list[Path]:
    return [p for p in (_onnx_for(ctx, precision) for precision in ctx.target.precisions) if p is not None]


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    target = ctx.target
    backend = get_backend(target.backend)
    artifacts = []
    for precision in target.precisions:
        onnx_path = _onnx_for(ctx, precision)
        if onnx_path is None:
            continue
        artifact = backend.compile(onnx_path, stage_dir, precision, calib=None)
        record = artifact.to_dict()
        record["path"] = str(artifact.path.relative_to(ctx.run_dir))
        artifacts.append(record)
    return {
        "target": target.to_dict(),
        "artifacts": artifacts,
        "artifact_files": [record["path"] for record in artifacts],
    }


STAGE = Stage("compile", _run, recipe_fields("target"), _inputs)
