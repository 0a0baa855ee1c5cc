"""Microcontroller targets (``cortex-m*``): a fully-INT8 LiteRT (TFLite) model run under TensorFlow Lite
Micro, its tensor arena, a fit check against the target's flash and SRAM, a cycle estimate and the
firmware sources (C array, op resolver, example ``main.cc``).

Everything that converts or runs a model needs the ``mcu`` extra (``pip install -e '.[mcu]'``:
litert-torch, ai-edge-litert, tflite-micro); :func:`missing` says what is absent. The firmware
generators and the fit and cycle models need only the parsed model description.
"""

from __future__ import annotations

import importlib.util

# Import name -> PyPI name of what the mcu extra brings.
REQUIRED = {
    "litert_torch": "litert-torch",
    "ai_edge_litert": "ai-edge-litert",
    "tflite_micro": "tflite-micro",
}
INSTALL = "pip install -e '.[mcu]'  (litert-torch, ai-edge-litert, tflite-micro)"


def missing() -> list[str]:
    """PyPI names of the mcu extra's packages that cannot be imported here (empty: all present)."""
    return [pypi for module, pypi in REQUIRED.items() if importlib.util.find_spec(module) is None]
