"""Cycles per inference on a Cortex-M core, ESTIMATED from the op list and the MACs (nothing here runs on
a microcontroller).

The model: ``cycles = sum over ops of (MACs x cycles_per_mac[core][op] + output elements x
cycles_per_element[core] + OP_OVERHEAD)``. The kernels are CMSIS-NN's (Lai, Suda and Chandra,
"CMSIS-NN: Efficient Neural Network Kernels for Arm Cortex-M CPUs", arXiv:1801.06601, 2018), which TFLM
uses on Cortex-M: INT8 convolutions and fully connected layers as im2col + matrix multiplication with the
DSP extension's dual 16-bit MAC (``SMLAD``: 2 MACs per instruction) on Cortex-M4/M7, and with Helium
(MVE: 16 INT8 lanes per vector, ``VMLADAV``) on Cortex-M55. The per-MAC costs are edgekd's assumptions
from those instruction throughputs plus im2col, load and requantisation overhead, not measurements:

- Cortex-M4: 1 ``SMLAD`` (2 MACs) per cycle at best, single-issue, loads compete -> ~1.0 cycle/MAC for
  convolutions, 1.3 for fully connected (weight-load bound), 2.0 for depthwise (no reuse).
- Cortex-M7: dual-issue, 64-bit loads -> ~0.5 / 0.7 / 1.0.
- Cortex-M55 with Helium: 8-16 MACs per beat pair -> ~0.2 / 0.3 / 0.4.

Data-movement ops (transpose, reshape, pooling, quantize) cost ``cycles_per_element`` per output
element. ``OP_OVERHEAD`` is the interpreter's per-op dispatch. Measured figures from a board (``--device``
with a serial runner, a later step) go in the ``measured_cycles`` slot of the record next to this
estimate; the two are never mixed.
"""

from __future__ import annotations

from typing import Any

from edgekd.mcu.tflite_model import TfliteModel

OP_OVERHEAD = 400  # cycles per op: TFLM's invoke loop, kernel prologue, parameter checks

# core -> op -> cycles per MAC (ops not listed do no MACs)
CYCLES_PER_MAC: dict[str, dict[str, float]] = {
    "cortex-m4": {"CONV_2D": 1.0, "FULLY_CONNECTED": 1.3, "DEPTHWISE_CONV_2D": 2.0, "BATCH_MATMUL": 1.3},
    "cortex-m7": {"CONV_2D": 0.5, "FULLY_CONNECTED": 0.7, "DEPTHWISE_CONV_2D": 1.0, "BATCH_MATMUL": 0.7},
    "cortex-m55": {"CONV_2D": 0.2, "FULLY_CONNECTED": 0.3, "DEPTHWISE_CONV_2D": 0.4, "BATCH_MATMUL": 0.3},
}
# core -> cycles per output element of ops without MACs (and the requantised output of those with)
CYCLES_PER_ELEMENT = {"cortex-m4": 4.0, "cortex-m7": 2.5, "cortex-m55": 1.0}


def estimate_cycles(model: TfliteModel, core: str, clock_mhz: float) -> dict[str, Any]:
    """The estimate for ``model`` on ``core`` at ``clock_mhz``: total cycles, milliseconds, per op type."""
    if core not in CYCLES_PER_MAC:
        raise ValueError(f"no cycle model for core {core!r}; known: {', '.join(CYCLES_PER_MAC)}")
    per_mac, per_element = CYCLES_PER_MAC[core], CYCLES_PER_ELEMENT[core]
    by_op: dict[str, float] = {}
    for op in model.ops:
        cycles = op.macs * per_mac.get(op.op, 1.5 * max(per_mac.values())) + op.output_elements * per_element
        by_op[op.op] = by_op.get(op.op, 0.0) + cycles + OP_OVERHEAD
    total = int(round(sum(by_op.values())))
    return {
        "kind": "estimate",
        "core": core,
        "clock_mhz": clock_mhz,
        "macs": model.macs,
        "cycles": total,
        "ms": round(total / (clock_mhz * 1e3), 3),
        "by_op": {name: int(round(value)) for name, value in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "model": "CMSIS-NN per-op model (edgekd/mcu/cycles.py): MACs x cycles/MAC "
        f"+ elements x cycles/element + {OP_OVERHEAD} per op",
        "measured_cycles": None,
    }
