"""PyTorch student -> fully-INT8 ``.tflite`` with Google's ``litert-torch`` and its PT2E quantizer.

Route chosen over "via ONNX" (measured, see ``docs``/README MCU section): litert-torch converts the
PyTorch module directly and quantises it once, with PT2E (``torch.export`` + observers calibrated on
our frames), into a model whose every tensor, inputs and outputs included, is INT8; the ONNX route
(onnx2tf) needs TensorFlow (a 645 MB wheel) and its resolver downgrades numpy to 1.26, onnx to 1.19 and
onnxruntime to 1.23 — edgekd's own pins break — and re-quantises in TensorFlow anyway.

Quantisation (PT2E, ``get_symmetric_quantization_config``): INT8 activations, per-tensor affine,
histogram observers; INT8 weights symmetric (per channel by default); INT32 biases. This is the
TFLite INT8 scheme of Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference" (CVPR 2018), which CMSIS-NN's kernels implement.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.atomic import atomic_path
from edgekd.errors import ExportError, QuantizeError, first_line

if TYPE_CHECKING:
    from edgekd.quantize.calibration import CalibrationSet

TOOL = "litert-torch PT2E"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _quiet() -> Any:
    """litert-torch prints a progress tree and absl logs: keep them out of edgekd's log."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger().setLevel(level)


def convert_int8(
    model: Any, calib: CalibrationSet, out_path: Path, per_channel: bool = True
) -> dict[str, Any]:
    """Write ``model`` as a fully-INT8 ``.tflite`` at ``out_path``, calibrated on ``calib``; its record.

    The record holds the tool and versions, the scheme, the calibration provenance, the input and
    output scale / zero point (``real = scale * (q - zero_point)``) and the seconds taken.
    """
    import torch

    try:
        import litert_torch
        from litert_torch.quantize import pt2e_quantizer, quant_config
        from torchao.quantization.pt2e import quantize_pt2e
    except ImportError as exc:
        raise QuantizeError(
            f"converting to .tflite needs litert-torch ({exc}); install it with: pip install -e '.[mcu]'"
        ) from None
    from edgekd.mcu.tflite_model import read_tflite

    started = time.perf_counter()
    model = model.eval()
    example = (torch.from_numpy(calib.data[:1]),)
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=per_channel)
    )
    try:
        with _quiet():
            graph = torch.export.export(model, example).module()
            prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
            with torch.no_grad():
                for frame in calib.data:  # the exported graph has batch 1, as it runs on the MCU
                    prepared(torch.from_numpy(frame[None]))
            converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
            edge = litert_torch.convert(
                converted, example, quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer)
            )
            with atomic_path(out_path) as tmp:
                edge.export(str(tmp))
    except Exception as exc:  # torch.export / the MLIR converter raise many exception types
        raise ExportError(
            f"litert-torch could not convert {type(model).__name__} to INT8 .tflite "
            f"({type(exc).__name__}: {first_line(exc, '')}); an op it cannot lower needs another student "
            f"or another target"
        ) from None
    parsed = read_tflite(out_path)
    not_int8 = [t.name for t in (*parsed.inputs, *parsed.outputs) if t.dtype != "int8"]
    if not_int8:
        raise QuantizeError(f"{out_path}: tensors {not_int8} are not INT8; the model is not fully quantised")
    return {
        "tool": TOOL,
        "format": "TFLite flatbuffer, fully INT8",
        "versions": {name: _version(name) for name in ("litert-torch", "torch", "torchao", "ai-edge-litert")},
        "weight_type": "int8",
        "activation_type": "int8",
        "symmetric_activations": False,
        "per_channel": per_channel,
        "method": "histogram (PT2E HistogramObserver)",
        "bias_type": "int32",
        "io_type": "int8",
        "input_quantization": {"scale": parsed.inputs[0].scale, "zero_point": parsed.inputs[0].zero_point},
        "output_quantization": {"scale": parsed.outputs[0].scale, "zero_point": parsed.outputs[0].zero_point},
        "calibration": calib.provenance(),
        "seconds": round(time.perf_counter() - started, 3),
    }


def quantize_input(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Float frames as the model's INT8 input: ``clip(round(x / scale) + zero_point, -128, 127)``."""
    return np.clip(np.round(np.asarray(x, np.float32) / scale) + zero_point, -128, 127).astype(np.int8)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return (q.astype(np.float32) - zero_point) * np.float32(scale)
