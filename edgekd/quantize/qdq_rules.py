"""TensorRT's explicit-quantisation rules for a QDQ ONNX model, checked before a build (and by the tests).

TensorRT builds INT8 from QuantizeLinear/DequantizeLinear pairs only when they are:

- INT8 and symmetric: every zero point present, of type INT8 and all 0 (a missing zero point means
  UINT8 output; ORT's default asymmetric activations use UINT8 with non-zero zero points);
- on activations and weights only: a DequantizeLinear of an INT32 tensor (ORT's quantised bias) is
  rejected by the parser ("only activation types allowed as input to this layer");
- per-tensor on activations (one scale), and on weights of Conv/ConvTranspose/Gemm/MatMul either per
  tensor or, with ``per_channel``, one scale per output channel along the output-channel axis;
- with finite, positive scales.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == name), default)


def _output_channel_axis(consumer: onnx.NodeProto) -> int:
    """Axis of a weight tensor that indexes output channels, for the op consuming it."""
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        return 0 if _attr(consumer, "transB", 0) else 1
    if consumer.op_type == "MatMul":
        return -1
    return 0


def tensorrt_qdq_violations(model: onnx.ModelProto | str | Path, per_channel: bool = True) -> list[str]:
    """Every way ``model`` breaks TensorRT's explicit-quantisation rules, one line each; [] when it complies.

    A model without any Q/DQ node is a violation too (there is nothing to build INT8 from).
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    graph = model.graph
    values = _constants(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # Weights quantised in the graph (float constant -> QuantizeLinear -> DequantizeLinear): the float.
    quantized_weights = {
        node.output[0]: values[node.input[0]]
        for node in graph.node
        if node.op_type == "QuantizeLinear" and node.input[0] in values
    }
    nodes = [node for node in graph.node if node.op_type in QDQ_OPS]
    if not nodes:
        return ["no QuantizeLinear/DequantizeLinear nodes: the model is not QDQ-quantised"]
    problems = []
    for node in nodes:
        label = f"{node.op_type} {node.name or node.output[0]!r}"
        scale = values.get(node.input[1])
        zero_point = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero_point is None:
            problems.append(f"{label}: no INT8 zero point (the default is UINT8); TensorRT needs INT8, 0")
        elif zero_point.dtype != np.int8:
            problems.append(f"{label}: zero point is {zero_point.dtype}, TensorRT needs int8")
        elif np.any(zero_point != 0):
            problems.append(f"{label}: zero point {zero_point.ravel()[:4].tolist()} is not 0 (asymmetric)")
        if scale is None:
            problems.append(f"{label}: scale {node.input[1]!r} is not a constant")
            continue
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            problems.append(f"{label}: scales must be finite and > 0")
        if node.op_type == "QuantizeLinear" and node.input[0] in values:
            continue  # a weight's quantiser: its DequantizeLinear is checked below
        weight = None
        if node.op_type == "DequantizeLinear":
            weight = values.get(node.input[0], quantized_weights.get(node.input[0]))
        if weight is None:
            if scale.size != 1:
                problems.append(f"{label}: activation scale has {scale.size} values; use one (per tensor)")
            continue
        if weight.dtype not in (np.int8, np.float32, np.float16):
            problems.append(
                f"{label}: dequantises a {weight.dtype} constant (e.g. a quantised bias); TensorRT accepts "
                f"only INT8 weights: keep biases in float"
            )
            continue
        problems += _weight_scale_problems(label, node, weight, scale, consumers, per_channel)
    return problems


def _weight_scale_problems(
    label: str,
    node: onnx.NodeProto,
    weight: np.ndarray,
    scale: np.ndarray,
    consumers: dict[str, list[onnx.NodeProto]],
    per_channel: bool,
) -> list[str]:
    users = [user for user in consumers.get(node.output[0], []) if user.op_type in _WEIGHTED]
    if not users or scale.size == 1:
        return (
            [f"{label}: weight scales are per tensor; TensorRT INT8 weights should be per output channel"]
            if users and per_channel and weight.ndim > 1
            else []
        )
    axis = _output_channel_axis(users[0]) % weight.ndim
    declared = _attr(node, "axis", 1) % weight.ndim
    if declared != axis or scale.ndim != 1 or scale.size != weight.shape[axis]:
        return [
            f"{label}: {scale.size} weight scales along axis {declared} for weight {tuple(weight.shape)} of "
            f"{users[0].op_type}; TensorRT needs one per output channel ({weight.shape[axis]}) "
            f"along axis {axis}"
        ]
    return []
