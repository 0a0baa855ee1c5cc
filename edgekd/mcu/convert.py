"""PyTorch student -> fully-INT8 ``.tflite`` with Google's ``litert-torch`` and its PT2E quantizer.

Route chosen over "via ONNX" (measured, see ``docs``/README MCU section): litert-torch converts the
PyTorch module directly and quantises it once, with PT2E (``torch.export`` + observers calibrated on
our frames), into a model whose every tensor, inputs and outputs included, is INT8; the ONNX route
(onnx2tf) needs TensorFlow (a 645 MB wheel) and its resolver downgrades numpy to 1.26, onnx to 1.19 and
onnxruntime to 1.23 — edgekd's own pins break — and re-quantises in TensorFlow anyway.

Inputs and outputs: INT8 by default (the converter removes PT2E's Q at the input and DQ at the output;
the firmware quantises the frame with the recorded input scale / zero point), or float32 with
``io="float"`` (``compile.mcu_io``): the converter then runs in strict QDQ mode, which keeps those two,
so the model itself starts with QUANTIZE and ends with DEQUANTIZE and every other tensor is the same INT8.

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
IO_TYPES = ("int8", "float")


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


@contextlib.contextmanager
def _strict_qdq() -> Any:
    """Run litert-torch's MLIR converter in strict QDQ mode for one conversion: it keeps every Q/DQ pair
    where PT2E put it, the input's QUANTIZE and the output's DEQUANTIZE included (float32 I/O).

    litert-torch (0.10) exposes the converter flag ``strict_qdq_mode`` on its config but no argument of
    ``litert_torch.convert`` sets it on this (non-TensorFlow) path, so the config is set as the converter
    passes run and restored afterwards.
    """
    from litert_torch._convert import litert_converter

    api = getattr(litert_converter, "converter_api_ext", None)
    original = getattr(api, "run_convert_to_tfl_passes", None)
    if original is None or not hasattr(api.ConvertToTFLConfig(), "strict_qdq_mode"):
        raise QuantizeError(
            f"compile.mcu_io: float needs the strict QDQ mode of litert-torch's converter, which "
            f"litert-torch {_version('litert-torch')} does not expose; set compile.mcu_io: int8"
        )

    def passes(module: Any, manager: Any, config: Any) -> Any:
        config.strict_qdq_mode = True
        return original(module, manager, config)

    api.run_convert_to_tfl_passes = passes
    try:
        yield
    finally:
        api.run_convert_to_tfl_passes = original


def convert_int8(
    model: Any, calib: CalibrationSet, out_path: Path, per_channel: bool = True, io: str = "int8"
) -> dict[str, Any]:
    """Write ``model`` as an INT8 ``.tflite`` at ``out_path``, calibrated on ``calib``; its record.

    ``io``: ``"int8"`` (every tensor INT8, inputs and outputs included) or ``"float"`` (float32 input and
    output, QUANTIZE / DEQUANTIZE at the boundary inside the model). The record holds the tool and
    versions, the scheme, the calibration provenance, the I/O type and, for INT8 I/O, the input and
    output scale / zero point (``real = scale * (q - zero_point)``), and the seconds taken.
    """
    if io not in IO_TYPES:
        raise QuantizeError(f"compile.mcu_io must be one of {', '.join(IO_TYPES)}, got {io!r}")
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
        with _quiet(), _strict_qdq() if io == "float" else contextlib.nullcontext():
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
    except QuantizeError:
        raise
    except Exception as exc:  # torch.export / the MLIR converter raise many exception types
        raise ExportError(
            f"litert-torch could not convert {type(model).__name__} to INT8 .tflite "
            f"({type(exc).__name__}: {first_line(exc, '')}); an op it cannot lower needs another student "
            f"or another target"
        ) from None
    parsed = read_tflite(out_path)
    io_dtype = "int8" if io == "int8" else "float32"
    wrong = [f"{t.name} ({t.dtype})" for t in (*parsed.inputs, *parsed.outputs) if t.dtype != io_dtype]
    if wrong:
        raise QuantizeError(
            f"{out_path}: input/output tensors {wrong} are not {io_dtype} as compile.mcu_io={io} asks; "
            f"the converter did not quantise the model as expected (litert-torch {_version('litert-torch')})"
        )
    if io == "float" and not {"QUANTIZE", "DEQUANTIZE"} <= set(parsed.op_types):
        raise QuantizeError(f"{out_path}: float I/O without QUANTIZE/DEQUANTIZE ops: the model is not INT8")
    return {
        "tool": TOOL,
        "format": "TFLite flatbuffer, fully INT8" if io == "int8" else "TFLite flatbuffer, INT8, float32 I/O",
        "versions": {name: _version(name) for name in ("litert-torch", "torch", "torchao", "ai-edge-litert")},
        "weight_type": "int8",
        "activation_type": "int8",
        "symmetric_activations": False,
        "per_channel": per_channel,
        "method": "histogram (PT2E HistogramObserver)",
        "bias_type": "int32",
        "io_type": io_dtype,
        "input_quantization": _io_quantization(parsed.inputs[0]),
        "output_quantization": _io_quantization(parsed.outputs[0]),
        **({"io_boundary": "QUANTIZE at the input, DEQUANTIZE at the output"} if io == "float" else {}),
        "calibration": calib.provenance(),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _io_quantization(tensor: Any) -> dict[str, Any] | None:
    """Scale and zero point of an INT8 input/output tensor; None for a float32 one."""
    if tensor.dtype != "int8":
        return None
    return {"scale": tensor.scale, "zero_point": tensor.zero_point}


def quantize_input(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Float frames as the model's INT8 input: ``clip(round(x / scale) + zero_point, -128, 127)``."""
    return np.clip(np.round(np.asarray(x, np.float32) / scale) + zero_point, -128, 127).astype(np.int8)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return (q.astype(np.float32) - zero_point) * np.float32(scale)
