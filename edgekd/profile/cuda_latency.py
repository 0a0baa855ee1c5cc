"""Device-side latency of a GPU runner with CUDA events: engine time only, no host copies or Python.

A runner qualifies when it has ``prepare(batch)`` (copy the batch to the device once), ``enqueue()``
(launch asynchronously) and ``stream`` (a :class:`~edgekd.backends.cuda_runtime.Stream`), like the
TensorRT runner. Events come from cuda-python (``cudaEventRecord`` / ``cudaEventElapsedTime``), no torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekd.backends.cuda_runtime import Event
from edgekd.profile.latency import PERCENTILE_METHOD, summarize_ms


def supports_cuda_events(runner: Any) -> bool:
    return all(hasattr(runner, name) for name in ("prepare", "enqueue", "stream"))


def measure_cuda_latency(runner: Any, batch: np.ndarray, warmup: int, iterations: int) -> dict[str, Any]:
    """p50/p90/p99 of ``iterations`` launches, CUDA-event timed on the runner's stream, after ``warmup``."""
    runner.prepare(batch)
    for _ in range(warmup):
        runner.enqueue()
    pairs = [(Event(), Event()) for _ in range(iterations)]
    for start, end in pairs:
        start.record(runner.stream)
        runner.enqueue()
        end.record(runner.stream)
    runner.stream.synchronize()
    ms = np.array([start.elapsed_ms(end) for start, end in pairs], dtype=np.float64)
    result: dict[str, Any] = summarize_ms((ms * 1e6).astype(np.int64), len(batch))
    result.update(
        warmup=warmup,
        iterations=iterations,
        batch=len(batch),
        clock="CUDA events (cuda-python cudaEventRecord) around each launch on the runner's stream",
        percentile_method=f"numpy {PERCENTILE_METHOD}",
        includes="engine execution only (input already on the device, output left there)",
    )
    return result
