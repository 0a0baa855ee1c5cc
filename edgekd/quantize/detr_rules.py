"""INT8 rules for DETR-family detectors: which nodes of the exported graph stay in float, and why.

A DETR (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020; here the DAB-DETR
variant of :mod:`edgekd.models.detr`) has three places where INT8 costs far more than elsewhere,
the ones the post-training-quantisation literature on transformers keeps in higher precision (e.g.
Liu et al., "Post-Training Quantization for Vision Transformer", NeurIPS 2021; Lin et al., "FQ-ViT:
Post-Training Quantization for Fully Quantized Vision Transformer", IJCAI 2022, which needs special
quantisers for exactly LayerNorm and Softmax; Yuan et al., "PTQ4ViT", ECCV 2022, post-Softmax values):

- ``softmax``: the attention weights. They are a probability over the tokens, mostly tiny with a few
  large values; an 8-bit output grid with a step of 1/255 rounds most of them to zero. The group is
  the Softmax and the MatMul that multiplies its output with the values (else ONNX Runtime still
  quantises the Softmax's output for that MatMul's input);
- ``layernorm``: LayerNormalization (and a ReduceMean → Sub → ... decomposition of it): its input
  has a few channels with outliers far larger than the rest (inter-channel variation, FQ-ViT), so a
  per-tensor INT8 range leaves the other channels with a handful of levels. The group is the
  LayerNorm and the residual Add producing its input (else that input is still quantised);
- ``heads``: the class head's and box head's last layers, everything between them and the
  ``logits``/``boxes`` outputs, and the box refinement chain (DAB-DETR adds each layer's box delta to
  the inverse sigmoid of the previous layer's box, so the boxes pass through Log/Div/Sigmoid from
  layer to layer): a step of the box grid is a shift of the detection, and COCO's mAP@[.5:.95]
  counts IoU up to 0.95.

What has been measured (:data:`MEASURED`, ``benchmarks/detr_int8.py``): the shipped teacher
``builtin:detr-mnv3l-scenes`` (FP32 mAP 0.0974 on 300 held-out scenes), ONNX Runtime QDQ
(per-channel, minmax, 128 train scenes). INT8 costs little on ONNX Runtime either way: the rule set
keeps 0.0953 and naive full INT8 0.0948; OpenVINO running those QDQ models keeps 0.0943 and 0.0917.
The rules buy a little (0.0005 on ONNX Runtime, 0.0026 on OpenVINO), less than the literature's
warnings suggest for this small, low-mAP model; the profile stage measures the rule set and naive full
INT8 side by side on every detection run, where a larger model may show more. The rules are found by
op type and graph position (:func:`float_nodes`), not by node name, so they hold for any export.

ONNX Runtime (:func:`quantize_detr_ort`): static QDQ with those nodes in ``nodes_to_exclude``. Every
backend compiles that QDQ model, OpenVINO included (it reads the Q/DQ pairs as FakeQuantize and runs
them in INT8): NNCF's own INT8 of the float model keeps almost none of the mAP, with the DETR
settings NNCF offers (transformer model type, the heads ignored) or without; it is NNCF's MatMul
quantisation, since with every MatMul's inputs left in float it keeps the mAP (:data:`NNCF_MEASURED`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from edgekd.quantize.calibration import CalibrationSet

GROUPS = ("softmax", "layernorm", "heads")
OUTPUTS = ("logits", "boxes")
# Ops that end the walk back from an output: the head's last weighted layer (kept, the walk stops).
_WEIGHTED = frozenset({"MatMul", "Gemm", "Conv"})
# Ops the walk never enters: the decoder's normalisation (its own group) and graph plumbing.
_STOP = frozenset({"LayerNormalization"})
RULE_SET = "detr"
NAIVE = "naive"

#: The measurement quoted in the module docstring: held-out mAP@[.5:.95] (benchmarks/results/detr_int8.json).
MEASURED: dict[str, Any] = {
    "model": "builtin:detr-mnv3l-scenes, 128 px, 300 held-out built-in scenes, 128 calibration scenes",
    "onnxruntime": {"fp32": 0.0974, "detr_rules": 0.0953, "naive": 0.0948},
    "openvino_reading_the_qdq_model": {"fp32": 0.0984, "detr_rules": 0.0943, "naive": 0.0917},
}

#: Why a detector's OpenVINO INT8 is the QDQ model and not NNCF's: the same model, calibration and scenes.
NNCF_MEASURED: dict[str, Any] = {
    "detr_rules": 0.0038,
    "naive": 0.0039,
    "detr_rules_mixed_preset": 0.0040,
    "matmul_inputs_in_float": 0.0949,
    "summary": "NNCF's INT8 of this DETR scored mAP 0.0038 against 0.0984 in FP32 (DETR settings or not, "
    "either preset; 0.0949 only with every MatMul left in float); OpenVINO running the DETR-rules QDQ "
    "model, MatMuls in INT8, scored 0.0943 (benchmarks/detr_int8.py)",
}


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def head_nodes(model: onnx.ModelProto, outputs: Sequence[str] = OUTPUTS) -> list[str]:
    """Nodes between each named output and the last weighted layer (MatMul/Gemm/Conv) on every path
    back from it, that layer included; the walk does not enter LayerNormalization nodes."""
    graph = model.graph
    producers = _producers(graph)
    initializers = {init.name for init in graph.initializer}
    kept: list[str] = []
    seen: set[str] = set()
    queue = [name for name in outputs if name in producers]
    while queue:
        node = producers.get(queue.pop(0))
        if node is None or node.name in seen or node.op_type in _STOP:
            continue
        seen.add(node.name)
        kept.append(node.name)
        if node.op_type in _WEIGHTED:
            continue
        queue += [name for name in node.input if name and name not in initializers]
    return kept


def _layernorm_parts(graph: onnx.GraphProto) -> list[str]:
    """LayerNormalization nodes (and the ReduceMean of a decomposed one, feeding a Sub) with the
    residual Add that produces their input: a QDQ quantiser quantises a tensor when its producer is
    quantised, so the Add must stay float for the LayerNorm's input (where the outliers are) to."""
    consumers, producers = _consumers(graph), _producers(graph)
    names = []
    for node in graph.node:
        is_norm = node.op_type == "LayerNormalization"
        if not is_norm and node.op_type == "ReduceMean":
            is_norm = any(user.op_type == "Sub" for out in node.output for user in consumers.get(out, []))
        if not is_norm:
            continue
        source = producers.get(node.input[0])
        if source is not None and source.op_type == "Add":
            names.append(source.name)
        names.append(node.name)
    return names


def _softmax_parts(graph: onnx.GraphProto) -> list[str]:
    """Softmax nodes with the MatMul that consumes their output (attention weights x values): a QDQ
    quantiser quantises a tensor when a consumer is quantised, so the MatMul must stay float for the
    Softmax's output (the probabilities) to."""
    consumers = _consumers(graph)
    names = []
    for node in graph.node:
        if node.op_type == "Softmax":
            names.append(node.name)
            names += [user.name for user in consumers.get(node.output[0], []) if user.op_type == "MatMul"]
    return names


def float_nodes(model: onnx.ModelProto | str | os.PathLike[str], groups: Sequence[str] = GROUPS) -> dict:
    """Per group of :data:`GROUPS`, the names of the nodes the DETR rules keep in float."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown DETR rule groups {unknown}; choose from {list(GROUPS)}")
    found: dict[str, list[str]] = {}
    if "softmax" in groups:
        found["softmax"] = _softmax_parts(proto.graph)
    if "layernorm" in groups:
        found["layernorm"] = _layernorm_parts(proto.graph)
    if "heads" in groups:
        found["heads"] = head_nodes(proto)
    return found


def excluded(groups: dict[str, list[str]]) -> list[str]:
    """The union of the groups' node names, in first-seen order."""
    return list(dict.fromkeys(name for names in groups.values() for name in names))


def quantize_detr_ort(
    fp32_onnx: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    calib: CalibrationSet,
    groups: Sequence[str] = GROUPS,
    **options: Any,
) -> dict:
    """ONNX Runtime static QDQ INT8 of a DETR export with the rule set's nodes in float.

    ``groups`` () is naive full INT8 (every node ONNX Runtime can quantise). ``options`` go to
    :func:`edgekd.quantize.ort.quantize_static_int8`. The record adds ``rules`` (``detr`` or
    ``naive``) and ``float_groups`` (node count per group).
    """
    from edgekd.quantize.ort import quantize_static_int8

    source = Path(fp32_onnx)
    chosen = float_nodes(source, groups) if groups else {}
    info = quantize_static_int8(source, out_path, calib, exclude_nodes=excluded(chosen), **options)
    info["rules"] = RULE_SET if groups else NAIVE
    info["float_groups"] = {group: len(names) for group, names in chosen.items()}
    return info
