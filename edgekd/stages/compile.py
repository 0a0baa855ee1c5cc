"""Stage 5: compile an artifact per precision of the target with its backend.

Backends that quantise INT8 themselves (``Backend.quantizes_itself``, e.g. OpenVINO with NNCF)
compile INT8 from the float export with the calibration set (and the accuracy budget, if any),
recording in the artifact's ``quantization.kept_in_float`` the op types left in float; the others
compile the quantize stage's QDQ model. Backends that build on the device (TensorRT) go
through :mod:`edgekd.stages.device_build`, which also writes the deployable inputs and build script.

Quantisation-aware distillation (``quantize.mode: qad``, or the last rung of the accuracy ladder)
gives one QDQ ONNX that is the INT8 artifact of every backend: OpenVINO then converts that QDQ model
(its Q/DQ pairs become FakeQuantize) instead of running NNCF. On OpenVINO the ladder is NNCF's
accuracy-aware INT8, then QAD when NNCF misses the budget. A detector's INT8 is the quantize stage's
QDQ model (DETR rules) on every backend too: NNCF loses nearly all of a DETR's mAP
(:data:`edgekd.quantize.detr_rules.NNCF_MEASURED`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd.backends import BACKENDS, get_backend
from edgekd.backends.base import Artifact
from edgekd.errors import ExportError, first_line
from edgekd.pipeline import RunContext, Stage, recipe_fields
from edgekd.recipe import Recipe
from edgekd.stages.device_build import device_build
from edgekd.stages.quantize import (
    QAD_FILE,
    accuracy_budget,
    calibration_set,
    log_kept_in_float,
    may_run_qad,
    qad_files,
    qad_rung,
)
from edgekd.targets import Target, resolve_target


def _quantizes_itself(target: Target) -> bool:
    return BACKENDS.get(target.backend).quantizes_itself


def _qad_onnx(ctx: RunContext) -> Path | None:
    """The quantize stage's QAD model (QDQ ONNX for every backend), if it made one."""
    outputs = ctx.results["quantize"].outputs if "quantize" in ctx.results else {}
    if outputs.get("quantization", {}).get("tool", "").startswith("edgekd QAD"):
        return ctx.run_dir / outputs["int8_onnx_file"]
    return None


def _onnx_for(ctx: RunContext, precision: str) -> Path | None:
    """Source ONNX: the QDQ model for int8 unless the backend quantises, else the export."""
    if precision == "int8" and (qad := _qad_onnx(ctx)) is not None:
        return qad
    if precision == "int8" and _quantizes_itself(ctx.target) and ctx.task != "detection":
        return ctx.path("export", "onnx_file") if ctx.recipe.quantize.enabled else None
    if precision == "int8":
        outputs = ctx.results["quantize"].outputs
        return ctx.run_dir / outputs["int8_onnx_file"] if "int8_onnx_file" in outputs else None
    return ctx.path("export", "onnx_file")


def check_readable_onnx(path: Path, made_by: str) -> None:
    """ExportError naming ``path`` and the stage to rerun (``made_by``) when it is not a whole, valid
    ONNX model (e.g. truncated by a full disk or an interrupted copy): a backend would fail on it
    with a protobuf traceback or, worse, compile what is left."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        reason = first_line(exc, "unreadable").replace(f": {path}", "")
        raise ExportError(
            f"{path}: not a valid ONNX model, truncated or damaged ({type(exc).__name__}: {reason}); "
            f"rerun with --force {made_by}"
        ) from None


def _config(recipe: Recipe) -> dict[str, Any]:
    """The target; for self-quantising backends also what selects calibration and budget frames."""
    target = resolve_target(recipe.target)
    fields: tuple[str, ...] = ("target",)
    if _quantizes_itself(target):
        fields = ("target", "seed", "data", "quantize", *(("distill",) if may_run_qad(recipe) else ()))
    backend = BACKENDS.get(target.backend)
    if getattr(backend, "converts_from_torch", False):
        fields = (*fields, "compile")  # compile.mcu_io
    if backend.builds_without_runtime:  # whether engines are built here changes the outputs
        return {
            **recipe_fields("target", "compile")(recipe),
            "opt_batch": recipe.profile.batch_size,
            "builds_here": backend().available()[0],
        }
    return recipe_fields(*fields)(recipe)


def _inputs(ctx: RunContext) -> list[Path]:
    paths = {_onnx_for(ctx, precision) for precision in ctx.target.precisions}
    if (naive := _naive_qdq_onnx(ctx)) is not None:
        paths.add(naive)
    if _quantizes_itself(ctx.target) and ctx.recipe.quantize.max_accuracy_drop is not None:
        paths.update(qad_files(ctx))  # the ladder's QAD rung reads the student and the teacher
    return sorted(path for path in paths if path is not None)


def _naive_qdq_onnx(ctx: RunContext) -> Path | None:
    """Detection on a self-quantising backend (OpenVINO): the quantize stage's naive full-INT8 QDQ model,
    converted beside the INT8 artifact for the report's comparison."""
    if not _quantizes_itself(ctx.target) or "quantize" not in ctx.results:
        return None
    name = ctx.results["quantize"].outputs.get("naive_int8_onnx_file")
    return None if name is None else ctx.run_dir / name


def _record(ctx: RunContext, artifact: Artifact) -> tuple[dict[str, Any], list[str]]:
    """The artifact as recorded (path relative to the run dir) and its files (with companions)."""
    record = artifact.to_dict()
    record["path"] = str(artifact.path.relative_to(ctx.run_dir))
    extra = artifact.metadata.get("companion_files", [])
    return record, [record["path"], *(str(Path(f).relative_to(ctx.run_dir)) for f in extra)]


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    target = ctx.target
    for precision in target.precisions:
        if (path := _onnx_for(ctx, precision)) is not None:
            check_readable_onnx(path, "export" if path == ctx.path("export", "onnx_file") else "quantize")
    if BACKENDS.get(target.backend).builds_without_runtime:
        sources = {p: path for p in target.precisions if (path := _onnx_for(ctx, p)) is not None}
        built, outputs = device_build(ctx, stage_dir, BACKENDS.get(target.backend)(), sources)
        records = [_record(ctx, artifact) for artifact in built]
        return {
            "target": target.to_dict(),
            "artifacts": [record for record, _ in records],
            "artifact_files": [name for _, files in records for name in files],
            **outputs,
        }
    backend = get_backend(target.backend)
    artifacts = []
    files = []
    naive_files: list[str] = []  # detection on OpenVINO: the naive full-INT8 IR, measured, never bundled
    for precision in target.precisions:
        onnx_path = _onnx_for(ctx, precision)
        if onnx_path is None:
            continue
        if precision == "int8" and backend.quantizes_itself and onnx_path == _qad_onnx(ctx):
            quantization = ctx.results["quantize"].outputs["quantization"]
            artifact = _openvino_from_qdq(ctx, onnx_path, stage_dir, quantization)
        elif precision == "int8" and backend.quantizes_itself and ctx.task == "detection":
            artifact = _openvino_detr_int8(ctx, onnx_path, stage_dir)
            naive = artifact.metadata["quantization"]["naive"]
            naive_files += [naive["file"], naive["file"].removesuffix(".xml") + ".bin"]
        elif precision == "int8" and backend.quantizes_itself:
            extra = _torch_source(ctx) if getattr(backend, "converts_from_torch", False) else {}
            calib, budget = calibration_set(ctx), accuracy_budget(ctx)
            artifact = backend.compile(onnx_path, stage_dir, precision, calib=calib, budget=budget, **extra)
            if (fit := artifact.metadata.get("mcu", {}).get("fit")) is not None:
                from edgekd.mcu.fit import describe

                ctx.log(f"  {ctx.target.name}: {describe(fit)}")
            if (note := artifact.metadata["quantization"].get("budget_not_applied")) is not None:
                ctx.log(f"  warning: {note}")
            log_kept_in_float(ctx, artifact.metadata["quantization"].get("kept_in_float"))
            control = artifact.metadata["quantization"].get("accuracy_control")
            if control is not None:
                ctx.log(
                    f"  INT8 drop {control['drop_after']:.4f} (budget {control['budget']['max_drop']}): "
                    f"{'met' if control['met'] else 'NOT met'}"
                )
                if not control["met"]:
                    artifact = _qad_rung_for_openvino(ctx, stage_dir, artifact)
        else:
            artifact = backend.compile(onnx_path, stage_dir, precision, calib=None)
        record, names = _record(ctx, artifact)
        artifacts.append(record)
        files += names
    out = {"target": target.to_dict(), "artifacts": artifacts, "artifact_files": files}
    if naive_files:
        out["naive_int8_files"] = naive_files
    return out


def _openvino_detr_int8(ctx: RunContext, qdq_path: Path, stage_dir: Path) -> Artifact:
    """A detector's OpenVINO INT8 IR: the quantize stage's QDQ model with the DETR rules, converted (its
    Q/DQ pairs become FakeQuantize, which the CPU plugin runs in INT8); the naive full-INT8 QDQ model
    converted beside it (recorded under ``quantization.naive``) so the report shows what the rules buy.
    Not NNCF: on a trained DETR its INT8 keeps almost none of the mAP, rules or not
    (:data:`edgekd.quantize.detr_rules.NNCF_MEASURED`)."""
    import openvino as ov

    from edgekd.backends.openvino import _save_ir, convert_onnx
    from edgekd.quantize.detr_rules import NNCF_MEASURED
    from edgekd.quantize.nncf import kept_in_float

    outputs = ctx.results["quantize"].outputs
    record = {
        **outputs["quantization"],
        "converted_by": f"OpenVINO {ov.get_version()} reads the QDQ ONNX (Q/DQ pairs -> FakeQuantize)",
        "why_not_nncf": NNCF_MEASURED["summary"],
    }
    naive_source = ctx.run_dir / outputs["naive_int8_onnx_file"]
    naive_target = stage_dir / "student.int8-naive.xml"
    naive_model = convert_onnx(naive_source)
    _save_ir(naive_model, naive_target, compress_to_fp16=False)
    record["naive"] = {
        "file": str(naive_target.relative_to(ctx.run_dir)),
        "source": outputs["naive_int8_onnx_file"],
        "rules": "naive",
        "kept_in_float": kept_in_float(naive_model),
    }
    artifact = _openvino_from_qdq(ctx, qdq_path, stage_dir, record)
    log_kept_in_float(ctx, artifact.metadata["quantization"].get("kept_in_float"))
    return artifact


def _torch_source(ctx: RunContext) -> dict[str, Any]:
    """What a backend converting from PyTorch (LiteRT) takes: the student (None for an ONNX model)."""
    from edgekd.stages.model_import import load_student, student_stage

    onnx_model = ctx.results[student_stage(ctx)].outputs.get("format") == "onnx"
    return {
        "model": None if onnx_model else load_student(ctx),
        "target": ctx.target,
        "io": ctx.recipe.compile.mcu_io,
    }


def _openvino_from_qdq(
    ctx: RunContext, onnx_path: Path, stage_dir: Path, quantization: dict[str, Any]
) -> Artifact:
    """OpenVINO IR of a QDQ ONNX model (Q/DQ pairs become FakeQuantize; OpenVINO runs them in INT8)."""
    from edgekd.backends.openvino import convert_onnx
    from edgekd.quantize.nncf import kept_in_float

    target = stage_dir / "student.int8.xml"
    model = convert_onnx(onnx_path)
    quantization = {**quantization, "kept_in_float": kept_in_float(model)}
    return _int8_ir_artifact(ctx, model, target, onnx_path, quantization)


def _int8_ir_artifact(
    ctx: RunContext, model: Any, target: Path, onnx_path: Path, quantization: dict[str, Any]
) -> Artifact:
    """Save ``model`` (INT8 OpenVINO, not compressed to FP16) as ``target`` (.xml + .bin): its artifact."""
    import openvino as ov

    from edgekd.backends.openvino import _save_ir
    from edgekd.hashing import sha256_file

    _save_ir(model, target, compress_to_fp16=False)
    weights = target.with_suffix(".bin")
    return Artifact(
        target,
        ctx.target.backend,
        "int8",
        {
            "source": str(onnx_path),
            "format": "OpenVINO IR",
            "openvino_version": ov.get_version(),
            "compress_to_fp16": False,
            "quantization": quantization,
            "companion_files": [str(weights)],
            "size_bytes": target.stat().st_size + weights.stat().st_size,
            "sha256": sha256_file(target),
            "weights_sha256": sha256_file(weights),
        },
    )


def _qad_rung_for_openvino(ctx: RunContext, stage_dir: Path, nncf_artifact: Artifact) -> Artifact:
    """The ladder's last rung on OpenVINO: NNCF missed the budget, so QAD; its IR replaces NNCF's."""
    budget = accuracy_budget(ctx)
    assert budget is not None
    control = nncf_artifact.metadata["quantization"]["accuracy_control"]
    ctx.log(f"  NNCF misses quantize.max_accuracy_drop={budget.max_drop}: quantisation-aware distillation")
    info, rung = qad_rung(ctx, stage_dir / QAD_FILE, calibration_set(ctx), budget, control["fp32_accuracy"])
    nncf_rung = {
        "rung": "nncf_accuracy_control",
        "file": None,
        "accuracy": control["int8_accuracy"],
        "drop": control["drop_after"],
        "met": False,
        "latency_ms": None,
        "seconds": None,
    }
    info["ladder"] = [nncf_rung, rung]
    info["nncf_quantization"] = nncf_artifact.metadata["quantization"]
    info["accuracy_control"] = {**control, "met": rung["met"], "drop_after": rung["drop"], "rung": "qad"}
    for stale in (nncf_artifact.path, nncf_artifact.path.with_suffix(".bin")):
        stale.unlink(missing_ok=True)
    return _openvino_from_qdq(ctx, stage_dir / QAD_FILE, stage_dir, info)


STAGE = Stage("compile", _run, _config, _inputs)
