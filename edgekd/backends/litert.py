"""LiteRT (TFLite) INT8 for microcontrollers, run under TensorFlow Lite Micro (targets ``cortex-m*``).

Unlike the other backends it converts from the PyTorch student, not from the ONNX export
(:mod:`edgekd.mcu.convert` says why): the compile stage passes ``model=`` (the distilled student) and
``target=``. The artifact is an INT8 ``.tflite`` (INT8 or, with ``compile.mcu_io: float``, float32 inputs and
outputs); its metadata ``mcu`` holds the model's ops and MACs, its I/O, the tensor arena TFLM's recording
allocator measured, the fit check against the target's flash and SRAM, and the cycle estimate (also for
every shipped ``cortex-m*`` target: ``by_target``). ``load`` runs it under TFLM's Python interpreter (the
reference kernels, bit-exact with CMSIS-NN by design), so the profile stage's accuracy is that of the
artifact as the microcontroller runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.backends import BACKENDS
from edgekd.backends.base import Artifact, Backend
from edgekd.errors import ExportError, RecipeError
from edgekd.hashing import sha256_file

if TYPE_CHECKING:
    from edgekd.quantize.calibration import CalibrationSet

ARTIFACT = "student.int8.tflite"
AGREEMENT_FRAMES = 256  # calibration frames run under both LiteRT and TFLM: the two interpreters agree?


@BACKENDS.register("litert", aliases=("tflite", "tflm"))
class LiteRTBackend(Backend):
    """litert-torch PT2E conversion to INT8 ``.tflite``; TFLM interpreter for running it here."""

    name = "litert"
    install = "pip install -e '.[mcu]'"
    precisions = ("int8",)
    quantizes_itself = True
    converts_from_torch = True  # compile() takes the PyTorch student (``model=``), see the module doc

    def available(self) -> tuple[bool, str]:
        from edgekd.mcu import missing

        absent = missing()
        if absent:
            return False, f"the mcu extra is not installed ({', '.join(absent)} cannot be imported)"
        return True, ""

    def compile(
        self,
        onnx_path: Path,
        out_dir: Path,
        precision: str,
        calib: CalibrationSet | None,
        budget: Any = None,
        model: Any = None,
        target: Any = None,
        io: str = "int8",
    ) -> Artifact:
        """Convert ``model`` (the PyTorch student ``onnx_path`` was exported from) to INT8 ``.tflite``,
        calibrated on ``calib``, with ``io`` (``compile.mcu_io``: int8 or float) inputs and outputs;
        measure its arena under TFLM; check it against ``target``'s ``mcu``.

        ``budget`` (``quantize.max_accuracy_drop``) is not applied: PT2E quantises every layer and no
        layer can be kept in float here; the quantisation record says so (``budget_not_applied``)."""
        from edgekd.mcu.convert import convert_int8
        from edgekd.mcu.cycles import estimate_cycles
        from edgekd.mcu.fit import arena_constant, fit_check
        from edgekd.mcu.interpreters import LiteRTRunner, TflmRunner, measure_arena
        from edgekd.mcu.tflite_model import read_tflite

        self.check_precision(precision)
        if model is None:
            raise ExportError(
                f"backend {self.name!r} converts the PyTorch student, and this run has none (the model "
                f"came as ONNX {onnx_path}); give the student as a PyTorch model or choose another target"
            )
        if calib is None:
            raise RecipeError(f"backend {self.name!r} builds INT8 only: enable quantize (calibration frames)")
        path = Path(out_dir) / ARTIFACT
        quantization = convert_int8(model, calib, path, io=io)
        if budget is not None:
            quantization["budget_not_applied"] = (
                f"quantize.max_accuracy_drop={budget.max_drop} is not applied on backend {self.name!r}: "
                f"litert-torch's PT2E quantises every layer to INT8 (no layer kept in float, no QAD rung); "
                f"compare the TFLM INT8 accuracy with the FP32 row in the report"
            )
        parsed = read_tflite(path)
        arena = measure_arena(path, calib.data[0])
        frames = calib.data[:AGREEMENT_FRAMES]
        tflm = TflmRunner(path).run(frames).argmax(axis=1)
        litert = LiteRTRunner(path).run(frames).argmax(axis=1)
        mcu: dict[str, Any] = {
            "model": parsed.to_dict(),
            "io": {
                "type": quantization["io_type"],
                "input": parsed.inputs[0].to_dict(),
                "output": parsed.outputs[0].to_dict(),
            },
            "arena": arena,
            "tensor_arena_bytes": arena_constant(arena["total_bytes"]),
            "interpreter_agreement": {
                "tflm_vs_litert_top1": float(np.mean(tflm == litert)),
                "frames": len(frames),
                "frames_from": "the calibration set (the held-out accuracy is the profile stage's)",
            },
        }
        spec = getattr(target, "mcu", None)
        if spec:
            mcu["target"] = target.name
            mcu["fit"] = fit_check(parsed, arena["total_bytes"], spec)
            mcu["cycles"] = estimate_cycles(parsed, spec["core"], spec["clock_mhz"])
        mcu["by_target"] = _by_target(parsed, arena["total_bytes"])
        metadata = {
            "source": "the distilled PyTorch student (litert-torch), exported ONNX: " + str(onnx_path),
            "format": "TFLite flatbuffer",
            "quantization": quantization,
            "mcu": mcu,
            "size_bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
        return Artifact(path, self.name, precision, metadata)

    def load(self, artifact: Artifact, threads: int | None = None) -> Any:
        """TFLM's interpreter over ``artifact`` (single-threaded, as on the microcontroller)."""
        from edgekd.mcu.interpreters import TflmRunner

        self.check_artifact(artifact)
        return TflmRunner(artifact.path)


def _by_target(parsed: Any, arena_total: int) -> list[dict[str, Any]]:
    """Fit check and cycle estimate of the model on every shipped microcontroller target (``targets/``):
    which of them it fits and how long each core would take (estimates, :mod:`edgekd.mcu.cycles`)."""
    from edgekd.mcu.cycles import CYCLES_PER_MAC, estimate_cycles
    from edgekd.mcu.fit import fit_check
    from edgekd.targets import load_targets

    rows = []
    cores = list(CYCLES_PER_MAC)  # Cortex-M4, M7, M55: the order of the table
    shipped = [(name, t) for name, t in load_targets().items() if t.mcu and t.mcu["core"] in cores]
    shipped.sort(key=lambda item: (cores.index(item[1].mcu["core"]), item[0]))
    for name, other in shipped:
        spec = other.mcu
        if not spec:
            continue
        fit = fit_check(parsed, arena_total, spec)
        cycles = estimate_cycles(parsed, spec["core"], spec["clock_mhz"])
        rows.append(
            {
                "target": name,
                "core": spec["core"],
                "part": spec.get("part"),
                "clock_mhz": spec["clock_mhz"],
                "fits": fit["fits"],
                "flash_needed_bytes": fit["flash"]["needed_bytes"],
                "flash_budget_bytes": fit["flash"]["budget_bytes"],
                "sram_needed_bytes": fit["sram"]["needed_bytes"],
                "sram_budget_bytes": fit["sram"]["budget_bytes"],
                "cycles": cycles["cycles"],
                "ms": cycles["ms"],
                "cycles_kind": cycles["kind"],
            }
        )
    return rows
