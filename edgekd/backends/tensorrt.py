"""TensorRT: ONNX → serialised engine (``.engine``) at FP32, FP16 or INT8, built on the GPU it runs on.

INT8 is explicit quantisation: the engine is built from the quantize stage's symmetric QDQ ONNX
(builder flags INT8 + FP16, no calibrator), so the INT8 ranges are the ones calibrated and recorded
there. Written against the TensorRT 10 Python API (JetPack 6 ships 10.3). ``tensorrt`` is imported
inside methods; device buffers, the stream and CUDA events come from NVIDIA's cuda-python
(:mod:`edgekd.backends.cuda_runtime`, no torch or pycuda), and inference runs with
``set_tensor_address`` + ``execute_async_v3`` on that stream.

Without TensorRT or a CUDA device here, the compile stage still writes the ONNX files and
``build_engine.sh`` (see :mod:`edgekd.backends.trtexec`): ``builds_without_runtime`` says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd import atomic
from edgekd.backends import BACKENDS, cuda_runtime
from edgekd.backends.base import PRECISIONS, Artifact, Backend
from edgekd.backends.cuda_runtime import DeviceBuffer, Stream
from edgekd.backends.trtexec import TIMING_CACHE, EngineOptions, onnx_input
from edgekd.errors import BackendUnavailable, ExportError, ModelError, QuantizeError, RecipeError
from edgekd.hashing import sha256_file
from edgekd.profile.layers import summarize_layers

if TYPE_CHECKING:
    from edgekd.quantize.calibration import CalibrationSet

INSTALL = (
    "on a Jetson, JetPack provides TensorRT (sudo apt install nvidia-jetpack; python3-libnvinfer) and "
    "pip install cuda-python; on an x86 NVIDIA GPU host, pip install tensorrt and pip install -e "
    "'.[tensorrt]' (cuda-python); or build the engines on the device with build_engine.sh"
)


def _network_flags(trt: Any) -> int:
    """Explicit batch: the default (and only mode) from TensorRT 10, a flag before it."""
    if int(trt.__version__.split(".")[0]) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        raise ModelError(f"TensorRT I/O tensor of type {dtype} is not supported by edgekd's runner") from None


class TensorRtRunner:
    """One execution context; input and outputs live in ``cudaMalloc`` buffers, work runs on one stream.

    ``run`` copies a batch in, executes and copies the first output back (synchronous). For
    device-side timing with CUDA events, ``prepare(batch)`` copies a batch in once and ``enqueue()``
    only launches the engine on ``stream`` (a :class:`~edgekd.backends.cuda_runtime.Stream`).
    """

    def __init__(self, engine: Any, context: Any, info: dict[str, Any], keep_alive: tuple) -> None:
        import tensorrt as trt

        self._trt = trt
        self._engine, self._context, self._keep_alive = engine, context, keep_alive
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or not self._outputs:
            raise ModelError(f"{info['artifact']}: expected one input and outputs, found inputs {inputs}")
        self._input = inputs[0]
        self._input_dtype = _numpy_dtype(trt, engine.get_tensor_dtype(self._input))
        self._buffers: dict[str, DeviceBuffer] = {}
        self._output = np.empty(0, np.float32)  # host copy of the first output, shaped by _bind
        self._shape: tuple[int, ...] | None = None
        self.stream = Stream()
        self._layer_timer: Any = None
        self.info = info

    def _bind(self, shape: tuple[int, ...]) -> None:
        """Set the input shape and (re)allocate every I/O buffer for it."""
        if not self._context.set_input_shape(self._input, shape):
            raise ModelError(
                f"{self.info['artifact']} rejected input shape {shape}: outside the engine's optimisation "
                f"profile {self.info['profile']}"
            )
        layouts = {self._input: (shape, self._input_dtype)}
        for name in self._outputs:
            out_shape = tuple(self._context.get_tensor_shape(name))
            if any(dim < 0 for dim in out_shape):
                raise ModelError(f"{self.info['artifact']}: output {name!r} has a data-dependent shape")
            layouts[name] = (out_shape, _numpy_dtype(self._trt, self._engine.get_tensor_dtype(name)))
        self._buffers = {
            name: DeviceBuffer(int(np.prod(dims)) * dtype.itemsize) for name, (dims, dtype) in layouts.items()
        }
        for name, buffer in self._buffers.items():
            self._context.set_tensor_address(name, buffer.pointer)
        self._output = np.empty(*layouts[self._outputs[0]])
        self._shape = shape

    def prepare(self, batch: np.ndarray) -> None:
        """Copy ``batch`` into the input buffer (binding shapes when they change); waits for the copy."""
        host = np.ascontiguousarray(batch, dtype=self._input_dtype)
        if host.shape != self._shape:
            self._bind(host.shape)
        self._buffers[self._input].upload(host, self.stream)
        self.stream.synchronize()

    def enqueue(self) -> None:
        """Launch the engine on ``stream`` (asynchronous)."""
        if not self._context.execute_async_v3(int(self.stream)):
            raise ModelError(f"TensorRT failed to execute {self.info['artifact']}")

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.prepare(batch)
        self.enqueue()
        self._buffers[self._outputs[0]].download(self._output, self.stream)
        self.stream.synchronize()
        if self._layer_timer is not None:
            self._context.report_to_profiler()  # the finished launch's per-layer times
        return self._output.astype(np.float32)  # a copy: the next run reuses the host buffer

    def named_outputs(self) -> dict[str, np.ndarray]:
        """Every output of the last :meth:`run` by name, as float32 host copies (a detector's
        ``logits`` and ``boxes``: :class:`edgekd.profile.detection_post.OutputsRunner`)."""
        found = {}
        for name in self._outputs:
            dtype = _numpy_dtype(self._trt, self._engine.get_tensor_dtype(name))
            found[name] = np.empty(tuple(self._context.get_tensor_shape(name)), dtype)
            self._buffers[name].download(found[name], self.stream)
        self.stream.synchronize()
        return {name: value.astype(np.float32) for name, value in found.items()}

    def time_layers(self) -> dict[str, list[float]]:
        """From now on, collect each layer's time in every ``run`` (TensorRT's ``IProfiler``); returns
        the dict it fills: layer name -> ms in each run."""
        trt = self._trt

        class LayerTimer(trt.IProfiler):
            def __init__(self) -> None:
                trt.IProfiler.__init__(self)
                self.times: dict[str, list[float]] = {}

            def report_layer_time(self, layer_name: str, ms: float) -> None:
                self.times.setdefault(layer_name, []).append(ms)

        self._layer_timer = LayerTimer()
        self._context.profiler = self._layer_timer
        self._context.enqueue_emits_profile = False  # reported after each run's stream sync instead
        return self._layer_timer.times

    def layer_types(self) -> dict[str, str]:
        """Layer name -> layer type, from the engine inspector (names need DETAILED profiling verbosity)."""
        inspector = self._engine.create_engine_inspector()
        layers = json.loads(inspector.get_engine_information(self._trt.LayerInformationFormat.JSON))["Layers"]
        return {layer["Name"]: layer.get("LayerType", "layer") for layer in layers if isinstance(layer, dict)}


@BACKENDS.register("tensorrt", aliases=("trt",))
class TensorRtBackend(Backend):
    """TensorRT on the local CUDA GPU (or a DLA core); engines from ONNX with an optimisation profile."""

    name = "tensorrt"
    install = INSTALL
    precisions = ("fp32", "fp16", "int8")
    # Without TensorRT or a GPU here, the compile stage still writes the ONNX files and build_engine.sh.
    builds_without_runtime = True

    def available(self) -> tuple[bool, str]:
        """Needs the tensorrt module, cuda-python and a CUDA device; ``why`` names each one missing."""
        problems = []
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            problems.append(f"the tensorrt Python module cannot be imported ({exc})")
        cuda_problem = cuda_runtime.missing()
        if cuda_problem is not None:
            problems.append(cuda_problem)
        return (False, "; ".join(problems)) if problems else (True, "")

    def _require(self) -> None:
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(f"backend 'tensorrt' is unavailable: {why}; {INSTALL}")

    def compile(
        self,
        onnx_path: Path,
        out_dir: Path,
        precision: str,
        calib: CalibrationSet | None,
        options: EngineOptions | None = None,
    ) -> Artifact:
        """Build ``<stem>.<precision>.engine`` in ``out_dir``: FP32/FP16 from float ONNX, INT8 from QDQ.

        The timing cache ``out_dir/timing.cache`` is read before and written after each build, so
        later builds (other precisions, reruns) reuse the measured tactics. ``calib`` is unused:
        INT8 ranges come from the QDQ model.
        """
        import onnx

        from edgekd.quantize.ort import is_quantized
        from edgekd.quantize.qdq_rules import tensorrt_qdq_violations

        self.check_precision(precision)
        self._require()
        import tensorrt as trt

        options = options or EngineOptions()
        source = Path(onnx_path)
        if not source.is_file():
            raise ExportError(f"ONNX model {source} not found; run the export stage first")
        model = onnx.load(str(source), load_external_data=False)
        if (precision == "int8") != is_quantized(model):
            raise RecipeError(
                f"{source}: backend 'tensorrt' builds int8 from a QDQ model (explicit quantisation) and "
                f"fp32/fp16 from a float model; pass the {'QDQ' if precision == 'int8' else 'float'} ONNX"
            )
        if precision == "int8" and (violations := tensorrt_qdq_violations(model)):
            raise QuantizeError(f"{source} breaks TensorRT's QDQ rules: {violations[0]}")
        input_name, sample_shape = onnx_input(source)
        base, _, suffix = source.stem.rpartition(".")
        target = Path(out_dir) / f"{base if suffix in PRECISIONS else source.stem}.{precision}.engine"
        cache_file = Path(out_dir) / TIMING_CACHE

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(_network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(source)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise ModelError(f"TensorRT cannot parse {source}: {errors[0] if errors else 'unknown error'}")
        config = builder.create_builder_config()
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, *options.profile(sample_shape))
        config.add_optimization_profile(profile)
        if options.dla_core is not None:
            if options.dla_core >= builder.num_DLA_cores:
                raise BackendUnavailable(
                    f"compile.dla_core={options.dla_core}: this device has "
                    f"{builder.num_DLA_cores} DLA core(s)"
                )
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = options.dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ModelError(f"TensorRT failed to build an engine from {source} (see the TensorRT log above)")
        atomic.write_bytes(target, bytes(serialized))
        atomic.write_bytes(cache_file, bytes(config.get_timing_cache().serialize()))
        layers = target.with_suffix(".layers.json")
        runtime = trt.Runtime(logger)  # kept alive as long as the engine it deserialises
        if options.dla_core is not None:
            runtime.DLA_core = options.dla_core
        engine = runtime.deserialize_cuda_engine(bytes(serialized))
        inspector = engine.create_engine_inspector()
        atomic.write_text(layers, inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        metadata = {
            "source": str(source),
            "format": "TensorRT engine",
            "tensorrt_version": trt.__version__,
            "device_name": cuda_runtime.device_name(),
            "builder_flags": {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}[precision],
            "int8_mode": "explicit quantisation (QDQ ONNX)" if precision == "int8" else None,
            "profile": options.profile_record(input_name, sample_shape),
            "dla_core": options.dla_core,
            "timing_cache": str(cache_file),
            "layer_info_file": str(layers),
            "companion_files": [str(layers)],
            "size_bytes": target.stat().st_size,
            "sha256": sha256_file(target),
        }
        return Artifact(target, self.name, precision, metadata)

    def load(self, artifact: Artifact, threads: int | None = None) -> TensorRtRunner:
        """Deserialise ``artifact`` on this GPU (``threads`` does not apply: recorded as None)."""
        self.check_artifact(artifact)
        self._require()
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        dla_core = artifact.metadata.get("dla_core")
        if dla_core is not None:
            runtime.DLA_core = dla_core
        engine = runtime.deserialize_cuda_engine(artifact.path.read_bytes())
        if engine is None:
            raise ModelError(
                f"TensorRT {trt.__version__} cannot load {artifact.path}: engines only load on the GPU and "
                f"TensorRT version that built them; rebuild it here (compile stage or build_engine.sh)"
            )
        context = engine.create_execution_context()
        info = {
            "backend": self.name,
            "artifact": str(artifact.path),
            "precision": artifact.precision,
            "threads": None,
            "version": trt.__version__,
            "device_name": cuda_runtime.device_name(),
            "dla_core": dla_core,
            "profile": artifact.metadata.get("profile"),
            "execution": "execute_async_v3 on a CUDA stream; I/O in cudaMalloc buffers (cuda-python)",
        }
        return TensorRtRunner(engine, context, info, keep_alive=(runtime, logger))

    def layer_times(
        self,
        artifact: Artifact,
        batch: np.ndarray,
        runs: int,
        warmup: int = 0,
        threads: int | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """TensorRT's per-layer times (``IProfiler``, one report per ``run`` after its stream sync).

        Layer names are the engine's (fused layers carry the names of the ONNX nodes they merge when
        the engine was built with DETAILED profiling verbosity, as edgekd's builds are); ``op`` is the
        layer type from the engine inspector.
        """
        runner = self.load(artifact, threads)
        for _ in range(warmup):
            runner.run(batch)
        times = runner.time_layers()
        for _ in range(runs):
            runner.run(batch)
        types = runner.layer_types()
        return summarize_layers(
            {name: (types.get(name, "layer"), values) for name, values in times.items()},
            runs,
            "TensorRT IProfiler (per-layer GPU time of each run)",
        )
