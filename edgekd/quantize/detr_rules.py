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

What has been measured (:data:`MEASURED`; the stride-32, learned-anchor design before query
selection): edgekd:detr-mnv3 trained 6 minutes on 600 built-in scenes
(FP32 mAP ~0.0004: not yet a useful detector), ONNX Runtime QDQ (per-channel, minmax, 64 train
images), |INT8 - FP32| on 32 held-out images. Each group alone and all three moved the mean logit
error 0.095 -> 0.091 and the mean box error 0.0097 -> 0.0089 (8 %): on this model the INT8 error is
dominated by the quantised backbone and linear layers, not by these groups, and mAP could not show a
difference. The groups are therefore the literature's (above), not yet confirmed by a mAP drop on a
trained student; the profile stage measures the rule set and naive full INT8 side by side on every
detection run, which is where the confirmation (or a revision of the groups) must come from. The
rules are found by op type and graph position (:func:`float_nodes`), not by node name, so they hold
for any export of the model.

ONNX Runtime (:func:`quantize_detr_ort`): static QDQ with those nodes in ``nodes_to_exclude``.
OpenVINO (:func:`nncf_settings`): NNCF with ``model_type=TRANSFORMER`` (NNCF's own transformer
patterns keep Softmax and LayerNorm parts in float) and the head nodes in ``ignored_scope``.
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

#: The measurement quoted in the module docstring (mean |INT8 - FP32| on 32 held-out images).
MEASURED: dict[str, Any] = {
    "model": "edgekd:detr-mnv3, 6 min on 600 built-in scenes (FP32 mAP 0.0004)",
    "naive": {"logits_mean_abs_diff": 0.0947, "boxes_mean_abs_diff": 0.0097},
    "softmax": {"logits_mean_abs_diff": 0.0944, "boxes_mean_abs_diff": 0.0095},
    "layernorm": {"logits_mean_abs_diff": 0.0926, "boxes_mean_abs_diff": 0.0096},
    "heads": {"logits_mean_abs_diff": 0.0938, "boxes_mean_abs_diff": 0.0089},
    "all": {"logits_mean_abs_diff": 0.0913, "boxes_mean_abs_diff": 0.0089},
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


def nncf_settings(fp32_onnx: str | os.PathLike[str], ov_model: Any, naive: bool = False) -> dict[str, Any]:
    """``nncf.quantize`` keywords for a DETR: transformer model type and the heads in the ignored scope.

    OpenVINO names the converted nodes after the ONNX nodes' outputs; the heads' nodes are matched by
    those names, and ``validate=False`` keeps NNCF from failing on one a conversion fused away.
    ``naive``: no model type and no ignored scope (full INT8), the comparison row.
    """
    import nncf

    if naive:
        return {}
    proto = onnx.load(str(fp32_onnx), load_external_data=False)
    by_name = {node.name: node for node in proto.graph.node}
    wanted = {out for name in head_nodes(proto) for out in by_name[name].output} | set(head_nodes(proto))
    names = sorted(op.get_friendly_name() for op in ov_model.get_ops() if op.get_friendly_name() in wanted)
    return {
        "model_type": nncf.ModelType.TRANSFORMER,
        "ignored_scope": nncf.IgnoredScope(names=names, validate=False),
    }
