"""``build_engine.sh``: the ``trtexec`` command lines that build a target's TensorRT engines on the device.

Needs neither TensorRT nor a GPU (onnx is imported only to read a model's input): it is written for
every TensorRT target, so that the engines can be built where they run (engines are specific to the
GPU and the TensorRT version). Paths in the script are relative to its own folder, so the folder can
be copied to the device as it is. Without trtexec the script prints one line saying how to get it and
exits with :data:`EXIT_NO_TRTEXEC`.
"""

from __future__ import annotations

import os
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekd import atomic
from edgekd.errors import ExportError

TIMING_CACHE = "timing.cache"
SCRIPT_FILE = "build_engine.sh"
EXIT_NO_TRTEXEC = 4  # build_engine.sh: no trtexec on the device (1 is trtexec's own failure)
NO_TRTEXEC = (  # printed by build_engine.sh, which expands $TRTEXEC
    "trtexec not found on the device's PATH (nor at $TRTEXEC); install TensorRT (on a Jetson: sudo apt "
    "install nvidia-jetpack) or set TRTEXEC=/path/to/trtexec"
)


@dataclass(frozen=True)
class EngineOptions:
    """How an engine is built: batch range of the optimisation profile, DLA core, timing cache."""

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    dla_core: int | None = None

    def profile(self, sample_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) input shapes for a sample of ``sample_shape``."""
        return tuple((batch, *sample_shape) for batch in (self.min_batch, self.opt_batch, self.max_batch))

    def profile_record(self, input_name: str, sample_shape: tuple[int, ...]) -> dict[str, Any]:
        """The optimisation profile as recorded with an engine: input name and min/opt/max shapes."""
        low, opt, high = self.profile(sample_shape)
        return {"input": input_name, "min": list(low), "opt": list(opt), "max": list(high)}


@dataclass(frozen=True)
class EngineJob:
    """One engine to build: its ONNX source, precision and output files (all in one folder)."""

    precision: str
    onnx: Path
    engine: Path
    input_name: str
    sample_shape: tuple[int, ...]
    options: EngineOptions

    @property
    def layer_info(self) -> Path:
        return self.engine.with_suffix(".layers.json")


def onnx_input(path: Path) -> tuple[str, tuple[int, ...]]:
    """Name and per-sample shape of the single input of the ONNX model at ``path`` (batch axis dropped)."""
    import onnx  # not at import time: device-side code loads this package without onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(f"{path}: TensorRT targets need a model with one input, found {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    sample = [dim.dim_value if dim.HasField("dim_value") else None for dim in dims[1:]]
    if not dims or None in sample:
        raise ExportError(
            f"{path}: input {inputs[0].name!r} needs a batch axis and fixed sample dimensions, got "
            f"{[d.dim_param or d.dim_value for d in dims]}"
        )
    return inputs[0].name, tuple(int(d) for d in sample)


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_arguments(job: EngineJob) -> list[str]:
    """trtexec arguments building ``job`` (paths as given; the script passes names relative to its folder)."""
    low, opt, high = job.options.profile(job.sample_shape)
    args = [
        f"--onnx={job.onnx}",
        f"--saveEngine={job.engine}",
        f"--minShapes={job.input_name}:{_dims(low)}",
        f"--optShapes={job.input_name}:{_dims(opt)}",
        f"--maxShapes={job.input_name}:{_dims(high)}",
        f"--timingCacheFile={TIMING_CACHE}",
        "--profilingVerbosity=detailed",
        "--dumpLayerInfo",
        f"--exportLayerInfo={job.layer_info}",
    ]
    if job.precision == "fp16":
        args.append("--fp16")
    elif job.precision == "int8":  # explicit quantisation: INT8 where the QDQ nodes say, FP16 elsewhere
        args += ["--int8", "--fp16"]
    if job.options.dla_core is not None:
        args += [f"--useDLACore={job.options.dla_core}", "--allowGPUFallback"]
    return args


def write_build_script(path: Path, jobs: list[EngineJob], header: str) -> Path:
    """Write ``path`` (executable bash): one trtexec call per job, every argument shell-quoted.

    ``jobs`` name files inside ``path``'s folder; ``header`` is a comment (one or more lines).
    """
    folder = path.parent
    lines = [
        "#!/usr/bin/env bash",
        *(f"# {line}" if line else "#" for line in header.splitlines()),
        "# Run it on the device: ./build_engine.sh (set TRTEXEC=/path/to/trtexec if it is elsewhere).",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        'if ! command -v "$TRTEXEC" >/dev/null 2>&1; then',
        f'  echo "{NO_TRTEXEC}" >&2',
        f"  exit {EXIT_NO_TRTEXEC}",
        "fi",
    ]
    for job in jobs:
        local = EngineJob(
            job.precision,
            Path(os.path.relpath(job.onnx, folder)),
            Path(os.path.relpath(job.engine, folder)),
            job.input_name,
            job.sample_shape,
            job.options,
        )
        lines.append(f"echo {shlex.quote(f'building {local.engine} ({job.precision})')}")
        lines.append('"$TRTEXEC" ' + " ".join(shlex.quote(arg) for arg in trtexec_arguments(local)))
    atomic.write_text(path, "\n".join(lines) + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path
