"""Per-layer time of a compiled artifact: the slowest nodes, as the runtime's own profiler reports them.

Device-side code (standard library only). Each backend collects, per node, its op type and its time
in each of ``runs`` timed inferences with its runtime's profiler (ONNX Runtime's trace, OpenVINO's
performance counters) and hands them to :func:`summarize_layers`, which keeps the ``top`` slowest.
Nodes are ranked by their median time per run: on a busy host one preempted run (a 4 ms scheduler
tick on a 20 us node) would otherwise make any node look like the slowest; the mean is kept too.
"""

from __future__ import annotations

import statistics
from typing import Any

TOP_LAYERS = 10


def summarize_layers(
    times: dict[str, tuple[str, list[float]]], runs: int, source: str, top: int = TOP_LAYERS
) -> dict[str, Any]:
    """The ``top`` nodes by median ms per run (``times``: node -> (op, ms in each run it ran)).

    Returns ``source`` (which profiler), ``runs``, ``nodes`` (how many nodes ran),
    ``layers_ms_per_run`` (sum of the nodes' medians) and ``top``: per node its ``name``, ``op``,
    ``median_ms``, ``mean_ms`` (total / ``runs``) and ``share`` (its median over ``layers_ms_per_run``).
    Nodes whose median is 0 (below the profiler's resolution) are left out of ``top``.
    """
    medians = {name: statistics.median(values) for name, (_, values) in times.items() if values}
    total = sum(medians.values())
    ranked = sorted(
        (name for name in medians if medians[name] > 0),
        key=lambda name: (medians[name], sum(times[name][1])),
        reverse=True,
    )
    return {
        "source": source,
        "runs": runs,
        "nodes": len(times),
        "ranked_by": "median ms per run",
        "layers_ms_per_run": total,
        "top": [
            {
                "name": name,
                "op": times[name][0],
                "median_ms": medians[name],
                "mean_ms": sum(times[name][1]) / runs,
                "share": medians[name] / total,
            }
            for name in ranked[:top]
        ],
    }
