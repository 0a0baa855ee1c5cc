"""Latency of a runner: model-only and end-to-end, with the measurement protocol recorded.

Device-side code: imports only numpy and the standard library (no torch), so it runs wherever
the runtime does. Latency numbers that disagree between tools usually differ in protocol, so the
protocol (warm-up, iterations, batch, threads, clock, percentile method) travels with the numbers.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.errors import DataError, RecipeError

if TYPE_CHECKING:
    from edgekd.backends.base import Runner

PERCENTILE_METHOD = "linear"  # numpy.percentile's default: interpolates between closest ranks


def summarize_ms(durations_ns: np.ndarray, batch: int) -> dict[str, float]:
    """p50/p90/p99/mean/std/min/max in milliseconds and throughput in samples per second."""
    ms = durations_ns.astype(np.float64) / 1e6
    p50, p90, p99 = np.percentile(ms, [50, 90, 99], method=PERCENTILE_METHOD)
    mean = float(ms.mean())
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": mean,
        "std_ms": float(ms.std()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "throughput_per_s": batch / (mean / 1e3) if mean > 0 else float("inf"),
    }


def time_calls(call: Callable[[], Any], warmup: int, iterations: int) -> np.ndarray:
    """Run ``call`` ``warmup`` times untimed, then ``iterations`` times timed (ns each), GC paused."""
    for _ in range(warmup):
        call()
    durations = np.empty(iterations, dtype=np.int64)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(iterations):
            start = time.perf_counter_ns()
            call()
            durations[i] = time.perf_counter_ns() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return durations


def measure_latency(
    runner: Runner,
    sample: np.ndarray,
    warmup: int,
    iterations: int,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    postprocess: Callable[[np.ndarray], Any] | None = None,
) -> dict:
    """Time ``runner.run`` on a batch; with ``preprocess``, also the end-to-end pipeline.

    Without ``preprocess``, ``sample`` is the model's input batch. With it, ``sample`` is raw
    input: the model-only numbers time ``runner.run(preprocess(sample))`` with the preprocessing
    done once beforehand, and ``end_to_end`` times ``postprocess(runner.run(preprocess(sample)))``
    per call (``postprocess`` optional). Returns one flat dict: the model-only statistics
    (``p50_ms``, ``p90_ms``, ``p99_ms``, ``mean_ms``, ``std_ms``, ``min_ms``, ``max_ms``,
    ``throughput_per_s``), ``end_to_end`` (the same statistics, or None) and the protocol
    (``warmup``, ``iterations``, ``batch``, ``threads``, ``clock``, ``clock_resolution_ns``,
    ``percentile_method``, ``gc_disabled_while_timing``, ``end_to_end_includes``).
    """
    if warmup < 0:
        raise RecipeError(f"profile.warmup must be >= 0, got {warmup}")
    if iterations < 1:
        raise RecipeError(f"profile.iterations must be >= 1, got {iterations}")
    if postprocess is not None and preprocess is None:
        raise RecipeError(
            "measure_latency: postprocess needs preprocess (end-to-end is measured only with both)"
        )
    model_input = preprocess(sample) if preprocess is not None else sample
    if np.ndim(model_input) < 1 or len(model_input) == 0:
        raise DataError(
            f"measure_latency: need a batch shaped (B, ...) with B >= 1, got shape {np.shape(model_input)}"
        )
    batch = len(model_input)
    model_ns = time_calls(lambda: runner.run(model_input), warmup, iterations)
    result: dict[str, Any] = summarize_ms(model_ns, batch)
    result["end_to_end"] = None
    stages = None
    if preprocess is not None:
        finish = postprocess or (lambda outputs: outputs)
        e2e_ns = time_calls(lambda: finish(runner.run(preprocess(sample))), warmup, iterations)
        result["end_to_end"] = summarize_ms(e2e_ns, batch)
        stages = ["preprocess", "run", "postprocess"] if postprocess else ["preprocess", "run"]
    result.update(
        {
            "warmup": warmup,
            "iterations": iterations,
            "batch": batch,
            "threads": runner.info.get("threads"),
            "clock": "perf_counter",
            "clock_resolution_ns": time.get_clock_info("perf_counter").resolution * 1e9,
            "percentile_method": f"numpy {PERCENTILE_METHOD}",
            "gc_disabled_while_timing": True,
            "end_to_end_includes": stages,
        }
    )
    return result


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB (None where ``resource`` is unavailable, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float | None:
    """Resident memory of this process now, in MiB (Linux ``/proc/self/statm``; None elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            resident_pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def _status_mb(field: str) -> float | None:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB; None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (``VmHWM``) to its current size (Linux >= 4.0: writing 5
    to ``/proc/self/clear_refs``); False where that is not possible, and the peak stays the lifetime one."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


MEMORY_METHOD = (
    "resident memory of the measuring process (/proc/self/status): VmRSS before the artifact is "
    "loaded (after gc and glibc malloc_trim hand freed memory back), VmHWM (peak, reset to VmRSS just "
    "before loading via /proc/self/clear_refs) after loading and the timed runs at the profile batch; "
    "counts the runtime's heap, arenas, weights and the shared libraries it first maps, not memory "
    "reused without growing the process, nor GPU memory"
)


def runtime_arena(runner: Any) -> dict[str, Any] | None:
    """The runtime's own working-memory figure where it reports one: a TensorRT engine's device
    (activation and scratch) memory. ONNX Runtime and OpenVINO expose no arena size through Python."""
    engine = getattr(runner, "engine", None)
    for name in ("device_memory_size_v2", "device_memory_size"):
        size = getattr(engine, name, None) if engine is not None else None
        if isinstance(size, int):
            return {
                "bytes": size,
                "source": f"TensorRT ICudaEngine.{name} (GPU memory per execution context)",
            }
    return None


def _release_free_heap() -> bool:
    """Hand the C heap's free pages back to the kernel (glibc ``malloc_trim(0)``), so that an artifact
    reusing memory freed by earlier work still shows as added resident memory; False where unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


class MemoryWindow:
    """Resident memory added by loading and running one artifact: :data:`MEMORY_METHOD`.

    ``peak_added_mb`` (VmHWM - VmRSS before loading) is what the artifact needs resident at its peak
    on top of what the process already held; ``rss_added_mb`` is what it still holds after the runs.
    Where the peak cannot be reset (not Linux, or clear_refs refused), ``peak_added_mb`` is None:
    the lifetime peak would belong to earlier work (e.g. training), not to this artifact.
    """

    def start(self) -> MemoryWindow:
        gc.collect()
        self.trimmed = _release_free_heap()
        self.before = _status_mb("VmRSS")
        if self.before is None:
            self.before = current_rss_mb()
        self.reset = reset_peak_rss()
        return self

    def stop(self, runner: Any = None) -> dict[str, Any]:
        peak, now = _status_mb("VmHWM"), _status_mb("VmRSS") or current_rss_mb()
        before = self.before

        def diff(value: float | None) -> float | None:
            return None if value is None or before is None else round(value - before, 2)

        return {
            "rss_before_mb": None if before is None else round(before, 2),
            "peak_rss_mb": None if peak is None or not self.reset else round(peak, 2),
            "peak_added_mb": diff(peak) if self.reset else None,
            "rss_added_mb": diff(now),
            "method": MEMORY_METHOD
            if self.reset
            else "VmRSS before loading vs after the runs (peak not resettable here)",
            "runtime_arena": runtime_arena(runner),
        }
