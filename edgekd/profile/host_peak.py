"""This host's attainable dense GEMM throughput, measured with ONNX Runtime: the ceiling a row's achieved
ops per second is compared with when its target's peak (``targets/*.yaml`` ``specs``) is null.

A generic "x86 CPU" target has no published peak, and one guessed from microarchitecture tables
(cores x clock x SIMD width x FMA ports) says little about what a runtime reaches. So one large dense
matrix product is timed here, with the runtime and thread count the artifacts were profiled with: an
ONNX Runtime session on the CPU execution provider with edgekd's session settings
(:func:`edgekd.backends.onnxruntime.session_options`: ``intra_op_num_threads`` = the profile's
threads, one inter-op thread, sequential execution, all graph optimisations). The right operand is a
constant initializer, as a model's weights are, so ONNX Runtime prepacks it.

- FP32: ``MatMul``, float32 x float32.
- INT8: ``MatMulInteger``, uint8 activations x int8 weights (int32 out), the fastest INT8 GEMM of
  ONNX Runtime's CPU EP we measured: on ONNX Runtime 1.32 (AMD EPYC, AVX-512 VNNI, 2 threads, 1024³)
  it ran at about 870 G ops/s against 820 for ``QLinearMatMul`` u8 x s8 (which adds requantisation),
  330 for u8 x u8 (either op) and 70 for ``MatMulInteger`` s8 x s8.
- FP16: not measured (:data:`FP16_WHY`): on this host ONNX Runtime 1.32 ran a float16 ``MatMul`` at
  its FP32 rate (through casts to f32), so an FP16 figure would only relabel the FP32 one.

ops = 2·M·N·K per call; a few warm-up calls, then the fastest of the timed calls: other work on the
machine only ever slows a call down (a 2-thread GEMM loses far more than half its rate when another
process takes one of two cores), so the best call is the closest to the ceiling (``median_ms`` is kept
too, to show the spread). A 1024³ product takes milliseconds here. The result is a measured ceiling
of this host and runtime, not a datasheet figure, and the report labels it so. OpenVINO rows are
compared with this same ONNX Runtime ceiling (labelled as ONNX Runtime's): one yardstick for both CPU
runtimes keeps their shares comparable with each other, at the cost that OpenVINO's own GEMM may reach
more or less.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekd.backends.base import resolve_threads

DEFAULT_SIZE = 1024
# precision -> (op, left operand dtype, right operand dtype, output dtype)
_GEMMS = {
    "fp32": ("MatMul", np.float32, np.float32, np.float32),
    "int8": ("MatMulInteger", np.uint8, np.int8, np.int32),
}
FP16_WHY = (
    "no FP16 ceiling is measured on a CPU: without native FP16 arithmetic an FP16 model computes in f32 "
    "(OpenVINO's inference precision in the row's runtime info says which), and ONNX Runtime runs an FP16 "
    "MatMul through f32 casts, so an FP16 'peak' would be the FP32 one relabelled"
)


def _operand(rng: np.random.Generator, dtype: type, size: int) -> np.ndarray:
    if dtype is np.float32:
        return rng.standard_normal((size, size), dtype=np.float32)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, (size, size), endpoint=True).astype(dtype)


def gemm_model(precision: str, size: int) -> Any:
    """The one-node ONNX model ``Y = A x B`` (``size`` square), B a constant initializer (seeded)."""
    from onnx import helper, numpy_helper

    op, left, right, out = _GEMMS[precision]
    weights = _operand(np.random.default_rng(0), right, size)
    inits = [numpy_helper.from_array(weights, "B")]
    inputs = ["A", "B"]
    if op == "MatMulInteger":
        inits += [
            numpy_helper.from_array(np.array(128, left), "A_zero"),
            numpy_helper.from_array(np.array(0, right), "B_zero"),
        ]
        inputs += ["A_zero", "B_zero"]
    to_onnx = helper.np_dtype_to_tensor_dtype
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["Y"])],
        f"gemm_{precision}_{size}",
        [helper.make_tensor_value_info("A", to_onnx(np.dtype(left)), [size, size])],
        [helper.make_tensor_value_info("Y", to_onnx(np.dtype(out)), [size, size])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def measure_gemm(
    precision: str, threads: int | None, size: int = DEFAULT_SIZE, warmup: int = 3, runs: int = 15
) -> dict[str, Any]:
    """Ops per second of one ``size``³ GEMM at ``precision`` (fp32 or int8) on ``threads`` threads
    (None: all cores), with the op, shape, threads, runtime version and a one-line ``source``."""
    import onnxruntime as ort

    from edgekd.backends.onnxruntime import session_options
    from edgekd.profile.latency import time_calls

    count = resolve_threads(threads)
    op, left, right, _ = _GEMMS[precision]
    session = ort.InferenceSession(
        gemm_model(precision, size).SerializeToString(),
        session_options(count),
        providers=["CPUExecutionProvider"],
    )
    feed = {"A": _operand(np.random.default_rng(1), left, size)}
    durations_ns = time_calls(lambda: session.run(None, feed), warmup, runs)
    best_ns = float(durations_ns.min())
    ops = 2 * size**3
    return {
        "precision": precision,
        "ops_per_s": ops / (best_ns / 1e9),
        "op": op,
        "dtypes": f"{np.dtype(left).name} x {np.dtype(right).name}",
        "shape": {"m": size, "k": size, "n": size},
        "ops_per_call": ops,
        "threads": count,
        "runtime": "onnxruntime",
        "runtime_version": ort.__version__,
        "execution_mode": "sequential",
        "warmup": warmup,
        "runs": runs,
        "statistic": "best of runs",
        "min_ms": best_ns / 1e6,
        "median_ms": float(np.median(durations_ns)) / 1e6,
        "source": (
            f"measured: ONNX Runtime {ort.__version__} {precision.upper()} {op} {size}³, "
            f"{count} thread{'' if count == 1 else 's'}, this host"
        ),
    }


def measure_host_peak(threads: int | None, size: int = DEFAULT_SIZE) -> dict[str, dict[str, Any]]:
    """Per precision (fp32, int8, fp16), this host's GEMM ceiling on ``threads`` threads; fp16 has
    ``ops_per_s`` None and a ``why``."""
    return {
        "fp32": measure_gemm("fp32", threads, size),
        "int8": measure_gemm("int8", threads, size),
        "fp16": {"precision": "fp16", "ops_per_s": None, "why": FP16_WHY},
    }
