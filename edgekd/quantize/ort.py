"""INT8 static post-training quantisation of an ONNX model with onnxruntime.quantization (QDQ format).

Quirks handled here:

- ``quant_pre_process`` (symbolic shape inference + graph optimisation) fails on some graphs: the raw
  model is then quantised and ``preprocess`` records ``"skipped: <reason>"``;
- ``quant_pre_process`` adds opset imports for every domain ORT knows (``com.microsoft``,
  ``ai.onnx.training``, ...) though no node uses them; other runtimes (TensorRT, OpenVINO) receive
  the same file, so unused imports are removed;
- the calibrators print progress and log warnings (e.g. "Axis 1 is out-of-range" for LayerNorm
  weights under per-channel): captured, and written to ``<output>.quantize.log`` on failure.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx

from edgekd.atomic import atomic_path
from edgekd.errors import QuantizeError, first_line
from edgekd.export.onnx import captured_output, failure_log_path, write_failure_log
from edgekd.quantize.calibration import DEFAULT_BATCH, CalibrationSet

METHODS = ("minmax", "entropy", "percentile")
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether ``model`` already holds QuantizeLinear/DequantizeLinear nodes."""
    return any(node.op_type in QDQ_OPS for node in model.graph.node)


def _graph_input(model: onnx.ModelProto, path: Path) -> onnx.ValueInfoProto:
    """The model's single real input (graph inputs that are not initializers)."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise QuantizeError(
            f"{path}: expected a model with one input, found {len(inputs)}: {[v.name for v in inputs]}"
        )
    return inputs[0]


def _check_shapes(value: onnx.ValueInfoProto, calib: CalibrationSet, path: Path) -> int | None:
    """Check calibration samples fit the input; return the input's fixed batch size, or None if dynamic."""
    dims = [dim.dim_value if dim.HasField("dim_value") else None for dim in value.type.tensor_type.shape.dim]
    expected = dims[1:]
    if len(expected) != len(calib.sample_shape) or any(
        want is not None and want != got for want, got in zip(expected, calib.sample_shape, strict=True)
    ):
        shown = tuple(d if d is not None else "?" for d in expected)
        raise QuantizeError(
            f"{path}: calibration samples have shape {calib.sample_shape} but input {value.name!r} expects "
            f"{shown}; calibrate with the model's training data and preprocessing"
        )
    return dims[0] if dims else None


def _prune_opset_imports(model: onnx.ModelProto) -> None:
    """Drop opset imports of domains no node uses (the default domain is always kept)."""
    used = {node.domain for node in model.graph.node} | {""}
    kept = [op for op in model.opset_import if op.domain in used or op.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def quantize_static_int8(
    fp32_onnx: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    calib: CalibrationSet,
    per_channel: bool = True,
    method: str = "minmax",
    symmetric_activations: bool = False,
    exclude_nodes: Sequence[str] = (),
    quantize_bias: bool = True,
) -> dict:
    """Quantise ``fp32_onnx`` to INT8 QDQ at ``out_path`` (written atomically), calibrated on ``calib``.

    Weights are QInt8 and symmetric (per output channel when ``per_channel``); activations are
    QUInt8 asymmetric, or QInt8 symmetric with zero point 0 when ``symmetric_activations`` (the
    form TensorRT's explicit-quantisation path accepts). ``method`` is the calibration method:
    minmax, entropy or percentile. Nodes named in ``exclude_nodes`` stay in float (e.g. the layers
    whose INT8 outputs diverge most from FP32). ``quantize_bias=False`` keeps biases in float
    (TensorRT rejects the INT32 DequantizeLinear that ORT puts on quantised biases). Returns
    ``{format, weight_type, activation_type, per_channel, symmetric_activations, quantize_bias, method,
    calibration, nodes_quantized, nodes_excluded, size_bytes, preprocess}``; ``calibration`` is the
    set's provenance with the samples really fed.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    source, target = Path(fp32_onnx), Path(out_path)
    if method not in METHODS:
        close = difflib.get_close_matches(method, METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise QuantizeError(
            f"unknown quantize.calibration_method {method!r}{hint}; choose one of {', '.join(METHODS)}"
        )
    if not source.is_file():
        raise QuantizeError(
            f"FP32 model {source} not found; run the export stage first or pass an existing .onnx file"
        )
    try:
        fp32 = onnx.load(str(source))
    except Exception as exc:
        raise QuantizeError(f"{source} is not a readable ONNX model: {first_line(exc, '')}") from exc
    if is_quantized(fp32):
        raise QuantizeError(f"{source} is already quantised (it holds QuantizeLinear/DequantizeLinear nodes)")
    unknown = sorted(set(exclude_nodes) - {node.name for node in fp32.graph.node})
    if unknown:
        raise QuantizeError(
            f"{source}: no nodes named {', '.join(unknown)} to keep in float; check the node names"
        )
    graph_input = _graph_input(fp32, source)
    fixed_batch = _check_shapes(graph_input, calib, source)
    batch = fixed_batch or DEFAULT_BATCH
    if fixed_batch and len(calib) < fixed_batch:
        raise QuantizeError(
            f"{source} has a fixed batch of {fixed_batch} but only {len(calib)} calibration samples "
            f"are used; raise quantize.calibration_samples to at least {fixed_batch}"
        )
    reader = calib.reader(graph_input.name, batch_size=batch, drop_last=fixed_batch is not None)
    activation_type = QuantType.QInt8 if symmetric_activations else QuantType.QUInt8
    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    with tempfile.TemporaryDirectory(prefix="edgekd-quant-") as workdir, captured_output() as captured:
        prepared = Path(workdir) / "preprocessed.onnx"
        try:
            quant_pre_process(str(source), str(prepared))
            model_input, preprocess = prepared, "ok"
        except Exception as exc:
            model_input, preprocess = source, f"skipped: {type(exc).__name__}: {first_line(exc, '')}"
        if model_input == prepared and exclude_nodes:
            renamed = set(exclude_nodes) - {node.name for node in onnx.load(str(prepared)).graph.node}
            if renamed:  # graph optimisation fused or renamed them: quantise the raw model instead
                model_input = source
                preprocess = f"skipped: pre-processing removed excluded nodes {', '.join(sorted(renamed))}"
        with atomic_path(target) as tmp:
            try:
                quantize_static(
                    str(model_input),
                    str(tmp),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=activation_type,
                    weight_type=QuantType.QInt8,
                    calibrate_method=calibrate_method,
                    nodes_to_exclude=list(exclude_nodes),
                    extra_options={
                        "ActivationSymmetric": symmetric_activations,
                        "WeightSymmetric": True,
                        "CalibTensorRangeSymmetric": symmetric_activations,
                        "QuantizeBias": quantize_bias,
                    },
                )
                quantized = onnx.load(str(tmp))
                _prune_opset_imports(quantized)
                onnx.checker.check_model(quantized)
                onnx.save(quantized, str(tmp))
            except Exception as exc:
                log = write_failure_log(target, "quantize", captured, exc)
                raise QuantizeError(
                    f"INT8 quantisation of {source} failed: {type(exc).__name__}: {first_line(exc, '')} "
                    f"(full log: {log})"
                ) from exc
    failure_log_path(target, "quantize").unlink(missing_ok=True)
    calibration = calib.provenance()
    calibration["samples_used"] = reader.samples_yielded
    calibration["batch_size"] = batch
    return {
        "format": "QDQ",
        "weight_type": "QInt8",
        "activation_type": "QInt8" if symmetric_activations else "QUInt8",
        "per_channel": per_channel,
        "symmetric_activations": symmetric_activations,
        "quantize_bias": quantize_bias,
        "method": method,
        "calibration": calibration,
        "nodes_quantized": sum(node.op_type in QDQ_OPS for node in quantized.graph.node),
        "nodes_excluded": list(exclude_nodes),
        "size_bytes": target.stat().st_size,
        "preprocess": preprocess,
    }
