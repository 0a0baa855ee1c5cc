"""OpenVINO on the CPU: ONNX → IR (``.xml`` + ``.bin``) at FP32, FP16 (weights compressed) or INT8 (NNCF).

INT8 is built here from the float model by NNCF post-training quantisation with the calibration
set (and, with an accuracy budget, NNCF's accuracy control), not from the quantize stage's QDQ
ONNX. openvino and nncf are imported inside methods only; loading and running need only numpy
and openvino.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.backends import BACKENDS
from edgekd.backends.base import PRECISIONS, Artifact, Backend, resolve_threads
from edgekd.backends.signal_stack import openvino_signal_stack
from edgekd.errors import BackendUnavailable, ExportError, ModelError, QuantizeError, RecipeError, first_line
from edgekd.hashing import sha256_file
from edgekd.profile.layers import summarize_layers

if TYPE_CHECKING:
    from edgekd.quantize.budget import AccuracyBudget
    from edgekd.quantize.calibration import CalibrationSet

INSTALL = "pip install -e '.[openvino]' (or pip install 'edgekd[openvino]')"
DEVICE = "CPU"


def _type_name(value: Any) -> str:
    """``<Type: 'bfloat16'>`` → ``bf16``."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


class OpenVinoRunner:
    """One synchronous infer request of a model compiled for the CPU; ``run`` returns the first output."""

    def __init__(self, compiled: Any, info: dict[str, Any]) -> None:
        import openvino

        self._tensor = openvino.Tensor
        self._request = compiled.create_infer_request()
        self._bound: np.ndarray | None = None  # the array the request's input tensor shares memory with
        self._path = info["artifact"]
        self.info = info

    def run(self, batch: np.ndarray) -> np.ndarray:
        array = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            # a zero-copy input tensor, bound once per array (it reads the array's current values at
            # every infer), and a bare infer(): ~30 µs less Python around each request than
            # infer({0: array}), which matters when a whole request takes a fraction of a ms
            if array is not self._bound:
                self._request.set_input_tensor(0, self._tensor(array, shared_memory=True))
                self._bound = array
            self._request.infer()
        except Exception as exc:  # openvino raises RuntimeError with multi-line messages
            raise ModelError(
                f"{self._path} rejected a batch of shape {np.shape(batch)}: {first_line(exc)}"
            ) from exc
        return self._request.get_output_tensor(0).data.copy()

    def profiling_info(self) -> list[Any]:
        """The performance counters of the last ``run`` (the model must be compiled with PERF_COUNT)."""
        return self._request.get_profiling_info()

    @property
    def runtime_latency_ms(self) -> float:
        """OpenVINO's own timing of the last ``run`` (inside the runtime, without Python's call overhead)."""
        return float(self._request.latency)


def _save_ir(model: Any, target: Path, compress_to_fp16: bool) -> None:
    """Write ``target`` (.xml) and its .bin atomically: into a temp dir beside it, then rename (bin first)."""
    import openvino as ov

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.stem}.", dir=target.parent) as workdir:
        staged = Path(workdir) / target.name
        ov.save_model(model, str(staged), compress_to_fp16=compress_to_fp16)
        os.replace(staged.with_suffix(".bin"), target.with_suffix(".bin"))
        os.replace(staged, target)


def convert_onnx(path: Path) -> Any:
    """``ov.convert_model`` of the ONNX file ``path``; ModelError in one line when OpenVINO cannot."""
    import openvino as ov

    try:
        return ov.convert_model(str(path))
    except Exception as exc:
        raise ModelError(f"OpenVINO cannot convert {path}: {first_line(exc)}") from exc


@BACKENDS.register("openvino", aliases=("ov",))
class OpenVinoBackend(Backend):
    """OpenVINO Runtime, CPU plugin; performance hint (latency/throughput) and thread count recorded."""

    name = "openvino"
    install = INSTALL
    precisions = ("fp32", "fp16", "int8")
    quantizes_itself = True
    hints = ("latency", "throughput")

    def available(self) -> tuple[bool, str]:
        try:
            import openvino  # noqa: F401
        except ImportError as exc:
            return False, f"openvino is not installed ({exc})"
        try:
            found = importlib.util.find_spec("nncf") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return False, "nncf (INT8 quantisation for OpenVINO) is not installed"
        return True, ""

    def compile(
        self,
        onnx_path: Path,
        out_dir: Path,
        precision: str,
        calib: CalibrationSet | None,
        budget: AccuracyBudget | None = None,
    ) -> Artifact:
        """IR of the float ONNX at ``onnx_path``; INT8 by NNCF with ``calib`` (within ``budget`` if given)."""
        import onnx
        import openvino as ov

        from edgekd.quantize.ort import is_quantized

        self.check_precision(precision)
        source = Path(onnx_path)
        if not source.is_file():
            raise ExportError(
                f"ONNX model {source} not found; run the export stage first or pass an existing file"
            )
        if is_quantized(onnx.load(str(source), load_external_data=False)):
            raise RecipeError(
                f"{source} is already QDQ-quantised; backend 'openvino' quantises INT8 itself with NNCF: "
                f"pass the float model"
            )
        if precision == "int8" and calib is None:
            raise QuantizeError(
                f"backend {self.name!r}: int8 needs a calibration set; enable quantize or drop int8"
            )
        base, _, suffix = source.stem.rpartition(".")
        target = Path(out_dir) / f"{base if suffix in PRECISIONS else source.stem}.{precision}.xml"
        model = convert_onnx(source)
        metadata: dict[str, Any] = {
            "source": str(source),
            "format": "OpenVINO IR",
            "openvino_version": ov.get_version(),
            "compress_to_fp16": precision == "fp16",
        }
        if precision == "int8":
            try:
                from edgekd.quantize.nncf import quantize_openvino
            except ImportError as exc:  # pragma: no cover - available() checked nncf's presence
                raise BackendUnavailable(
                    f"nncf cannot be imported ({exc}); install it with: {INSTALL}"
                ) from exc
            model, metadata["quantization"] = quantize_openvino(model, calib, budget)
        _save_ir(model, target, compress_to_fp16=precision == "fp16")
        weights = target.with_suffix(".bin")
        metadata.update(
            companion_files=[str(weights)],
            size_bytes=target.stat().st_size + weights.stat().st_size,
            sha256=sha256_file(target),
            weights_sha256=sha256_file(weights),
        )
        return Artifact(target, self.name, precision, metadata)

    def load(self, artifact: Artifact, threads: int | None = None, hint: str = "latency") -> OpenVinoRunner:
        """Compile ``artifact`` for the CPU with performance ``hint`` and ``threads`` inference threads."""
        import openvino as ov

        core, compiled = self._compile(artifact, threads, hint)
        info = {
            "backend": self.name,
            "artifact": str(artifact.path),
            "precision": artifact.precision,
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
            "hint": hint,
            "device": DEVICE,
            "device_name": core.get_property(DEVICE, "FULL_DEVICE_NAME"),
            "inference_precision": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
            "inference_precision_source": "set to f32" if artifact.precision == "fp32" else "plugin default",
            "num_streams": int(compiled.get_property("NUM_STREAMS")),
            "optimal_infer_requests": int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")),
            "requests": "one synchronous infer request",
            "version": ov.get_version(),
        }
        return OpenVinoRunner(compiled, info)

    def _compile(
        self, artifact: Artifact, threads: int | None, hint: str, perf_count: bool = False
    ) -> tuple[Any, Any]:
        """``(core, compiled model)`` for the CPU with edgekd's settings; ``perf_count``: PERF_COUNT on."""
        import openvino as ov

        if artifact.backend != self.name:
            raise RecipeError(
                f"artifact {artifact.path} was built for backend {artifact.backend!r}, not {self.name!r}"
            )
        if hint not in self.hints:
            raise RecipeError(f"profile.openvino_hint must be one of {', '.join(self.hints)}, got {hint!r}")
        if not artifact.path.is_file() or not artifact.path.with_suffix(".bin").is_file():
            raise ModelError(f"artifact {artifact.path} (or its .bin) not found; run the compile stage again")
        core = ov.Core()
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": hint.upper(),
            "INFERENCE_NUM_THREADS": resolve_threads(threads),
        }
        if artifact.precision == "fp32":  # else the CPU plugin may compute in bf16 where the CPU has it
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if perf_count:
            config["PERF_COUNT"] = True
        try:
            with openvino_signal_stack():
                return core, core.compile_model(str(artifact.path), DEVICE, config)
        except Exception as exc:
            raise ModelError(f"OpenVINO cannot load {artifact.path}: {first_line(exc)}") from exc

    def layer_times(
        self,
        artifact: Artifact,
        batch: np.ndarray,
        runs: int,
        warmup: int = 0,
        threads: int | None = None,
        hint: str = "latency",
    ) -> dict[str, Any]:
        """OpenVINO's performance counters (PERF_COUNT): ``real_time`` per executed node, summed over runs.

        Node names are those of the compiled graph (the IR's names, plus the plugin's Reorder nodes);
        ``exec_type`` is the kernel the CPU plugin chose (e.g. ``brgconv_avx512``), showing the precision
        it really computed in.
        """
        import openvino as ov

        _, compiled = self._compile(artifact, threads, hint, perf_count=True)
        runner = OpenVinoRunner(compiled, {"artifact": str(artifact.path)})
        for _ in range(warmup):
            runner.run(batch)
        times: dict[str, tuple[str, list[float]]] = {}
        kernels: dict[str, str] = {}
        for _ in range(runs):
            runner.run(batch)
            for node in runner.profiling_info():
                if node.status != ov.ProfilingInfo.Status.EXECUTED:
                    continue
                times.setdefault(node.node_name, (node.node_type, []))[1].append(
                    node.real_time.total_seconds() * 1e3
                )
                kernels[node.node_name] = node.exec_type
        summary = summarize_layers(times, runs, "openvino CPU performance counters (real_time)")
        for layer in summary["top"]:
            layer["exec_type"] = kernels[layer["name"]]
        return summary
