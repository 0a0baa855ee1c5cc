"""ONNX Runtime on the CPU: FP32 (the exported ONNX as is) and INT8 (static QDQ quantisation).

onnxruntime is imported inside methods only; loading and running need nothing but numpy and
onnxruntime, so this module also serves on a device without torch.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.atomic import atomic_path
from edgekd.backends import BACKENDS
from edgekd.backends.base import PRECISIONS, Artifact, Backend, resolve_threads
from edgekd.errors import ExportError, ModelError, QuantizeError, RecipeError, first_line
from edgekd.hashing import sha256_file
from edgekd.profile.layers import summarize_layers

if TYPE_CHECKING:
    from edgekd.quantize.calibration import CalibrationSet

_KERNEL = "_kernel_time"  # suffix of a node's kernel event in ONNX Runtime's trace
_FUSION_SUFFIX = re.compile(r"_token_\d+$")  # added to nodes rewritten by QDQ fusion
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def session_options(threads: int) -> Any:
    """edgekd's ONNX Runtime session settings: ``threads`` intra-op threads, one inter-op thread,
    sequential execution, all graph optimisations, errors-only logging (shared by profiling and
    :mod:`edgekd.profile.host_peak`, so both run under the same settings)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: warnings would interleave with progress output
    return options


def host_threads() -> int:
    """Intra-op threads for ONNX Runtime work outside profiling (export parity, INT8 accuracy, an ONNX
    teacher's outputs, deploy's predictions): the count PyTorch runs with in this process, which
    :mod:`edgekd.threads` sizes (the user's ``OMP_NUM_THREADS``, else the cores other processes leave
    free), so both runtimes share one sizing; without torch loaded,
    :func:`edgekd.threads.training_threads`."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return max(1, torch.get_num_threads())
    from edgekd.threads import training_threads

    return training_threads()[0]


def cpu_session(model: str | Path | bytes, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU for ``model`` (a path or serialised bytes) with
    edgekd's :func:`session_options`, ``threads`` intra-op threads (default :func:`host_threads`)."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    options = session_options(threads or host_threads())
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class OrtRunner:
    """An ``onnxruntime.InferenceSession`` with one input and one (first) output."""

    def __init__(self, session: Any, info: dict[str, Any]) -> None:
        self._session = session
        model_input = session.get_inputs()[0]
        self._input = model_input.name
        self._output = [session.get_outputs()[0].name]
        self._dtype = _NUMPY_TYPES.get(model_input.type, np.float32)
        self._path = info["artifact"]
        self.info = info

    def run(self, batch: np.ndarray) -> np.ndarray:
        try:
            return self._session.run(self._output, {self._input: np.asarray(batch, dtype=self._dtype)})[0]
        except Exception as exc:  # onnxruntime raises its own exception types for bad inputs
            first = first_line(exc, "")
            raise ModelError(f"{self._path} rejected a batch of shape {np.shape(batch)}: {first}") from exc


@BACKENDS.register("onnxruntime", aliases=("ort",))
class OnnxRuntimeBackend(Backend):
    """ONNX Runtime, CPUExecutionProvider, sequential execution, all graph optimisations."""

    name = "onnxruntime"
    install = "pip install onnxruntime"
    precisions = ("fp32", "int8")

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return False, f"onnxruntime cannot be imported ({exc})"
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return False, f"onnxruntime {ort.__version__} has no CPUExecutionProvider"
        return True, ""

    def compile(
        self, onnx_path: Path, out_dir: Path, precision: str, calib: CalibrationSet | None
    ) -> Artifact:
        """FP32: copy ``onnx_path`` into ``out_dir``. INT8: quantise it with ``calib`` (per-channel, minmax).

        An ONNX file that is already QDQ-quantised (e.g. by the quantize stage with the recipe's
        settings) is copied as the INT8 artifact without calibration.
        """
        import onnx

        from edgekd.quantize.ort import is_quantized, quantize_static_int8

        self.check_precision(precision)
        source = Path(onnx_path)
        if not source.is_file():
            raise ExportError(
                f"ONNX model {source} not found; run the export stage first or pass an existing file"
            )
        base, _, suffix = source.stem.rpartition(".")
        target = Path(out_dir) / f"{base if suffix in PRECISIONS else source.stem}.{precision}.onnx"
        already_int8 = is_quantized(onnx.load(str(source), load_external_data=False))
        if precision == "fp32" and already_int8:
            raise RecipeError(
                f"{source} is INT8-quantised; compile it with precision int8, or pass the FP32 model"
            )
        if precision == "fp32" or already_int8:
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
            metadata: dict[str, Any] = {"source": str(source)}
        elif calib is None:
            raise QuantizeError(
                f"backend {self.name!r}: int8 needs a calibration set; "
                f"enable quantize or choose precision fp32"
            )
        else:
            metadata = {"source": str(source), "quantization": quantize_static_int8(source, target, calib)}
        metadata.update(size_bytes=target.stat().st_size, sha256=sha256_file(target))
        return Artifact(target, self.name, precision, metadata)

    def load(self, artifact: Artifact, threads: int | None = None) -> OrtRunner:
        import onnxruntime as ort

        count = resolve_threads(threads)
        session = self._session(artifact, count)
        info = {
            "backend": self.name,
            "artifact": str(artifact.path),
            "precision": artifact.precision,
            "threads": count,
            "inter_op_threads": 1,
            "execution_mode": "sequential",
            "graph_optimization": "ORT_ENABLE_ALL",
            "providers": session.get_providers(),
            "version": ort.__version__,
        }
        return OrtRunner(session, info)

    def _session(self, artifact: Artifact, threads: int, profile_prefix: Path | None = None) -> Any:
        """An InferenceSession with edgekd's settings; with ``profile_prefix``, ONNX Runtime's profiler on."""
        import onnxruntime as ort

        self.check_artifact(artifact)
        options = session_options(threads)
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(profile_prefix)
        try:
            return ort.InferenceSession(str(artifact.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = first_line(exc, "")
            raise ModelError(f"onnxruntime cannot load {artifact.path}: {first}") from exc

    def layer_times(
        self,
        artifact: Artifact,
        batch: np.ndarray,
        runs: int,
        warmup: int = 0,
        threads: int | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """ONNX Runtime's profiler trace: kernel time per node of the optimised graph, warm-up runs excluded.

        Node names are those of the graph ONNX Runtime executes: a fused node is ``fused <first node>``
        and a node rewritten by QDQ fusion ``<node>_token_<n>``; ``model_node`` maps both back to the
        artifact's node name (None for nodes the optimiser inserted, e.g. layout Transposes).
        """
        import onnx

        with tempfile.TemporaryDirectory(prefix="edgekd-ort-profile-") as workdir:
            session = self._session(artifact, resolve_threads(threads), Path(workdir) / "trace")
            runner = OrtRunner(session, {"artifact": str(artifact.path)})
            for _ in range(warmup + runs):
                runner.run(batch)
            with open(session.end_profiling(), encoding="utf-8") as handle:
                events = json.load(handle)
        starts = sorted(event["ts"] for event in events if event.get("name") == "model_run")
        first_timed = starts[warmup] if len(starts) > warmup else 0
        times: dict[str, tuple[str, list[float]]] = {}
        for event in events:
            if event.get("cat") != "Node" or not event["name"].endswith(_KERNEL) or event["ts"] < first_timed:
                continue
            name = event["name"][: -len(_KERNEL)]
            times.setdefault(name, (event.get("args", {}).get("op_name", ""), []))[1].append(
                event["dur"] / 1e3
            )
        summary = summarize_layers(times, runs, f"onnxruntime {session.get_providers()[0]} profiler")
        graph = {node.name for node in onnx.load(str(artifact.path), load_external_data=False).graph.node}
        for layer in summary["top"]:
            original = _FUSION_SUFFIX.sub("", layer["name"].removeprefix("fused "))
            layer["model_node"] = original if original in graph else None
        return summary
