"""Does a model fit a microcontroller? Flash = the ``.tflite`` bytes + TFLM and its kernels (an estimate
per registered op); SRAM = the tensor arena TFLM measured + the application's input and output buffers.

The code-size figures are edgekd's estimates of TFLM built with CMSIS-NN kernels at ``-Os`` for
Thumb-2 (order of magnitude: the interpreter, allocator and flatbuffer reader, then each kernel);
the linker map of the real firmware replaces them. The arena is measured (its recording allocator),
not estimated.
"""

from __future__ import annotations

from typing import Any

from edgekd.mcu.tflite_model import TfliteModel

FRAMEWORK_FLASH_BYTES = 24 * 1024  # MicroInterpreter, allocators, flatbuffer reader, error reporter
DEFAULT_KERNEL_FLASH_BYTES = 4 * 1024
KERNEL_FLASH_BYTES = {
    "CONV_2D": 8 * 1024,
    "DEPTHWISE_CONV_2D": 8 * 1024,
    "FULLY_CONNECTED": 4 * 1024,
    "BATCH_MATMUL": 6 * 1024,
    "MAX_POOL_2D": 2 * 1024,
    "AVERAGE_POOL_2D": 2 * 1024,
    "MEAN": 5 * 1024,
    "SOFTMAX": 3 * 1024,
    "ADD": 3 * 1024,
    "MUL": 3 * 1024,
    "QUANTIZE": 2 * 1024,
    "DEQUANTIZE": 2 * 1024,
    "TRANSPOSE": 2 * 1024,
    "RESHAPE": 512,
    "SQUEEZE": 512,
    "EXPAND_DIMS": 512,
}
ARENA_ALIGNMENT = 16


def arena_constant(measured_total: int) -> int:
    """The ``kTensorArenaSize`` the firmware declares: the measured total rounded up to 16 bytes plus 16
    (TFLM aligns the arena's start, which may cost up to 15 bytes)."""
    return -(-measured_total // ARENA_ALIGNMENT) * ARENA_ALIGNMENT + ARENA_ALIGNMENT


def fit_check(model: TfliteModel, arena_total: int, mcu: dict[str, Any]) -> dict[str, Any]:
    """Flash and SRAM needed by ``model`` against the target's ``mcu`` budget (``flash_kb``, ``sram_kb``)."""
    kernels = {op: KERNEL_FLASH_BYTES.get(op, DEFAULT_KERNEL_FLASH_BYTES) for op in model.op_types}
    flash = model.size_bytes + FRAMEWORK_FLASH_BYTES + sum(kernels.values())
    arena = arena_constant(arena_total)
    sram = arena + model.io_bytes()
    flash_budget, sram_budget = int(mcu["flash_kb"] * 1024), int(mcu["sram_kb"] * 1024)
    problems = []
    if flash > flash_budget:
        problems.append(f"flash {flash:,} B > {flash_budget:,} B")
    if sram > sram_budget:
        problems.append(f"SRAM {sram:,} B > {sram_budget:,} B")
    return {
        "fits": not problems,
        "problems": problems,
        "flash": {
            "needed_bytes": flash,
            "budget_bytes": flash_budget,
            "share": round(flash / flash_budget, 4),
            "model_bytes": model.size_bytes,
            "framework_bytes": FRAMEWORK_FLASH_BYTES,
            "kernel_bytes": kernels,
            "kind": "model bytes exact; framework and kernels estimated (edgekd/mcu/fit.py)",
        },
        "sram": {
            "needed_bytes": sram,
            "budget_bytes": sram_budget,
            "share": round(sram / sram_budget, 4),
            "arena_bytes": arena,
            "arena_measured_bytes": arena_total,
            "io_bytes": model.io_bytes(),
            "kind": "arena measured by TFLM's recording allocator; stack and application not included",
        },
    }


def describe(fit: dict[str, Any]) -> str:
    """One line for the log: flash and SRAM needed against the budget, and whether it fits."""
    flash, sram = fit["flash"], fit["sram"]
    verdict = "fits" if fit["fits"] else "DOES NOT FIT (" + "; ".join(fit["problems"]) + ")"
    return (
        f"flash {flash['needed_bytes'] / 1024:.1f} / {flash['budget_bytes'] / 1024:.0f} KiB, "
        f"SRAM {sram['needed_bytes'] / 1024:.1f} / {sram['budget_bytes'] / 1024:.0f} KiB "
        f"(arena {sram['arena_measured_bytes']:,} B measured): {verdict}"
    )
