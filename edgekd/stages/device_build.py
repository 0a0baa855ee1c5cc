"""The compile stage for backends that build on the device (``Backend.builds_without_runtime``: TensorRT).

Always written into the stage folder, so it can be copied to the device as it is: the float ONNX
(``student.onnx``), the QDQ ONNX (``student.int8.onnx``, checked against TensorRT's explicit
quantisation rules), its calibration provenance (``calibration.json``) and ``build_engine.sh`` with the
``trtexec`` command lines. The engines themselves are built here only when the runtime and a GPU are
present; otherwise each is recorded as not built, with the reason.
"""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from edgekd import atomic
from edgekd.backends.base import Artifact, Backend
from edgekd.backends.trtexec import (
    SCRIPT_FILE,
    EngineJob,
    EngineOptions,
    onnx_input,
    write_build_script,
)
from edgekd.errors import QuantizeError, RecipeError
from edgekd.pipeline import RunContext
from edgekd.quantize.qdq_rules import tensorrt_qdq_violations
from edgekd.recipe import Recipe
from edgekd.targets import Target

FLOAT_FILE = "student.onnx"
QDQ_FILE = "student.int8.onnx"
CALIBRATION_FILE = "calibration.json"


def engine_options(recipe: Recipe, target: Target) -> EngineOptions:
    """The engine build options of ``recipe`` for ``target``; a RecipeError when they cannot apply."""
    spec = recipe.compile
    if spec.dla_core is not None and spec.dla_core >= target.dla_cores:
        raise RecipeError(
            f"compile.dla_core={spec.dla_core}: target {target.name} has {target.dla_cores} DLA core(s); "
            f"set compile.dla_core to null (the GPU)"
            + (f" or to 0..{target.dla_cores - 1}" if target.dla_cores else "")
        )
    if recipe.profile.batch_size > spec.max_batch:
        raise RecipeError(
            f"profile.batch_size={recipe.profile.batch_size} is above compile.max_batch={spec.max_batch}, "
            f"the largest batch of the engine's optimisation profile; raise compile.max_batch"
        )
    return EngineOptions(1, recipe.profile.batch_size, spec.max_batch, spec.dla_core)


def _copy(source: Path, dest: Path) -> Path:
    with atomic.atomic_path(dest) as tmp:
        shutil.copyfile(source, tmp)
    return dest


def device_build(
    ctx: RunContext, stage_dir: Path, backend: Backend, sources: dict[str, Path]
) -> tuple[list[Artifact], dict[str, Any]]:
    """Write the deployable inputs for ``sources`` (precision -> ONNX); build the engines if possible.

    Returns the built artifacts and the outputs to record: ``build_script_file``, ``bundle_files``,
    ``qdq_check`` and ``unbuilt_artifacts`` (each with ``"profiled": False`` and ``why``, and the
    ``dla_core`` and optimisation ``profile`` the device needs to load the engine it builds).
    """
    target = ctx.target
    options = engine_options(ctx.recipe, target)
    copies = {
        precision: _copy(source, stage_dir / (QDQ_FILE if precision == "int8" else FLOAT_FILE))
        for precision, source in sources.items()
    }
    bundle = set(copies.values())
    qdq_check = None
    if "int8" in copies:
        violations = tensorrt_qdq_violations(copies["int8"])
        if violations:
            raise QuantizeError(
                f"{copies['int8']} breaks TensorRT's explicit-quantisation rules ({len(violations)} "
                f"problem(s)), first: {violations[0]}; rerun the quantize stage (--force quantize)"
            )
        qdq_check = {"rules": "TensorRT explicit quantisation (INT8, zero point 0, per-channel weights)"}
        calibration = ctx.output("quantize", "quantization")["calibration"]
        atomic.write_json(stage_dir / CALIBRATION_FILE, calibration)
        bundle.add(stage_dir / CALIBRATION_FILE)
    input_name, sample_shape = onnx_input(next(iter(copies.values())))
    jobs = [
        EngineJob(
            precision, onnx, stage_dir / f"student.{precision}.engine", input_name, sample_shape, options
        )
        for precision, onnx in copies.items()
    ]
    script = write_build_script(
        stage_dir / SCRIPT_FILE,
        jobs,
        f"TensorRT engines for target {target.name} ({target.description}), by edgekd "
        f"{metadata.version('edgekd')}.\nFP32/FP16 from the float ONNX; INT8 from the symmetric QDQ ONNX "
        f"(explicit quantisation: --int8 --fp16, no calibrator).",
    )
    bundle.add(script)
    ok, why = backend.available()
    built, unbuilt = [], []
    for job in jobs:
        if ok:
            built.append(backend.compile(job.onnx, stage_dir, job.precision, None, options=options))
            continue
        unbuilt.append(
            {
                "name": f"student ({backend.name} {job.precision.upper()})",
                "backend": backend.name,
                "precision": job.precision,
                "engine": str(job.engine.relative_to(ctx.run_dir)),
                "onnx": str(job.onnx.relative_to(ctx.run_dir)),
                "dla_core": options.dla_core,
                "profile": options.profile_record(input_name, sample_shape),
                "built": False,
                "profiled": False,
                "why": f"not built or profiled on this host: {why}; "
                f"build it on the device with {SCRIPT_FILE}",
            }
        )
    if not ok:
        ctx.log(f"  {backend.name} engines not built here ({why}); wrote {script.relative_to(ctx.run_dir)}")
    return built, {
        "build_script_file": str(script.relative_to(ctx.run_dir)),
        "bundle_files": sorted(str(path.relative_to(ctx.run_dir)) for path in bundle),
        "qdq_check": qdq_check,
        "unbuilt_artifacts": unbuilt,
    }
