"""Accuracy-aware INT8 for ONNX Runtime: the most sensitive nodes stay in float until the drop fits.

1. Quantise every node (QDQ) and measure the top-1 drop FP32 → INT8 on the budget's frames.
2. If it exceeds ``max_drop``: rank the quantised nodes by how much signal-to-quantisation-noise
   ratio (SQNR, dB, INT8 activations vs FP32 activations on a few frames) each node loses between
   its worst input and its output, i.e. the error the node itself adds.
3. Re-quantise with the top 1, 2, 4, ... ranked nodes excluded (kept in float) until the drop fits
   or every ranked node is excluded. The last attempt is the artifact; every attempt is recorded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgekd.quantize.budget import AccuracyBudget
from edgekd.quantize.calibration import CalibrationSet
from edgekd.quantize.ort import QDQ_OPS, is_quantized, quantize_static_int8

RANKING_FRAMES = 32  # frames whose intermediate activations are compared (memory grows with this)
RANKING_BATCH = 8
EVAL_BATCH = 256
SHOWN = 20  # ranked nodes kept in the record
_SUFFIXES = ("_QuantizeLinear_Input", "_DequantizeLinear_Output_1", "_DequantizeLinear_Output")


def _session(path: Path) -> Any:
    from edgekd.backends.onnxruntime import cpu_session

    return cpu_session(path)  # intra-op threads sized as PyTorch's (edgekd.threads)


def ort_accuracy(path: Path, budget: AccuracyBudget) -> float:
    """Top-1 accuracy of the ONNX model at ``path`` on the budget's frames (ONNX Runtime, CPU)."""
    session = _session(path)
    name = session.get_inputs()[0].name
    logits = [
        session.run(None, {name: budget.x[i : i + EVAL_BATCH]})[0] for i in range(0, len(budget), EVAL_BATCH)
    ]
    return budget.accuracy(np.concatenate(logits))


def _activations(path: Path, frames: np.ndarray, workdir: Path) -> dict[str, np.ndarray]:
    """Every float tensor of the model at ``path`` on ``frames`` (plus the graph input), by name."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        modify_model_output_intermediate_tensors,
    )

    augmented = workdir / f"{path.stem}.augmented.onnx"
    modify_model_output_intermediate_tensors(str(path), str(augmented))
    input_name = _session(path).get_inputs()[0].name
    batches = [{input_name: frames[i : i + RANKING_BATCH]} for i in range(0, len(frames), RANKING_BATCH)]
    collected = collect_activations(str(augmented), iter(batches))
    values = {name: np.concatenate([v.reshape(-1) for v in parts]) for name, parts in collected.items()}
    values[input_name] = frames.reshape(-1)
    return values


def _sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    eps = np.finfo(np.float32).eps
    signal = max(float(np.linalg.norm(reference)), eps)
    noise = max(float(np.linalg.norm(reference - other)), eps)
    return 20.0 * np.log10(signal / noise)


def _base(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def rank_sensitive_nodes(
    fp32_onnx: Path, int8_onnx: Path, frames: np.ndarray, candidates: set[str]
) -> list[dict[str, Any]]:
    """Quantised nodes named in ``candidates``, most sensitive first: ``[{node, op, sqnr_lost_db}]``.

    A node's sensitivity is the SQNR of its worst activation input (before that input's own
    quantisation) minus the SQNR of its output, both INT8 vs FP32 on ``frames``.
    """
    with tempfile.TemporaryDirectory(prefix="edgekd-sensitivity-") as workdir:
        floats = _activations(fp32_onnx, frames, Path(workdir))
        quantized = _activations(int8_onnx, frames, Path(workdir))
    graph = onnx.load(str(int8_onnx), load_external_data=False).graph
    producer = {output: node for node in graph.node for output in node.output}

    def sqnr(qdq_name: str) -> float | None:
        base = _base(qdq_name)
        if qdq_name not in quantized or base not in floats or floats[base].shape != quantized[qdq_name].shape:
            return None
        return _sqnr_db(floats[base], quantized[qdq_name])

    ranking = []
    for node in graph.node:
        if node.op_type in QDQ_OPS or node.name not in candidates:
            continue
        inputs = []
        for name in node.input:
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":  # an activation, not a weight
                inputs.append(sqnr(q.input[0]))
        out = sqnr(node.output[0])
        measured = [value for value in inputs if value is not None]
        if not inputs or out is None or not measured:
            continue
        ranking.append({"node": node.name, "op": node.op_type, "sqnr_lost_db": round(min(measured) - out, 3)})
    ranking.sort(key=lambda item: item["sqnr_lost_db"], reverse=True)
    return ranking


def quantize_within_budget(
    fp32_onnx: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    calib: CalibrationSet,
    budget: AccuracyBudget,
    **options: Any,
) -> dict:
    """:func:`quantize_static_int8` with an accuracy budget; returns its record plus ``accuracy_control``.

    ``accuracy_control`` holds ``met``, the FP32 accuracy, the drop before (every node INT8) and
    after, ``attempts``, ``excluded_nodes``, the sensitivity ranking (top entries) and each attempt.
    ``options`` are passed to :func:`quantize_static_int8` (per_channel, method, ...).
    """
    source, target = Path(fp32_onnx), Path(out_path)
    info = quantize_static_int8(source, target, calib, **options)
    fp32_accuracy = ort_accuracy(source, budget)
    accuracy = ort_accuracy(target, budget)
    attempts = [{"excluded": 0, "accuracy": accuracy, "drop": round(fp32_accuracy - accuracy, 6)}]
    ranking: list[dict[str, Any]] = []
    excluded: list[str] = []
    if fp32_accuracy - accuracy > budget.max_drop:
        names = {node.name for node in onnx.load(str(source), load_external_data=False).graph.node}
        ranking = rank_sensitive_nodes(source, target, budget.x[:RANKING_FRAMES], names)
        count = 1
        while fp32_accuracy - accuracy > budget.max_drop and count <= len(ranking):
            excluded = [item["node"] for item in ranking[:count]]
            info = quantize_static_int8(source, target, calib, exclude_nodes=excluded, **options)
            accuracy = ort_accuracy(target, budget)
            attempts.append(
                {"excluded": count, "accuracy": accuracy, "drop": round(fp32_accuracy - accuracy, 6)}
            )
            count = len(ranking) + 1 if count == len(ranking) else min(2 * count, len(ranking))
    drop = fp32_accuracy - accuracy
    met = drop <= budget.max_drop
    stopped = (
        "within budget"
        if met
        else (
            "every ranked node is in float and the drop still exceeds the budget"
            if ranking
            else "no quantised node could be ranked (no activation comparisons); nothing to keep in float"
        )
    )
    info["accuracy_control"] = {
        "method": "exclude the most SQNR-sensitive nodes (1, 2, 4, ...) until within budget",
        "budget": budget.record(),
        "met": met,
        "stopped": stopped,
        "fp32_accuracy": fp32_accuracy,
        "int8_accuracy_before": attempts[0]["accuracy"],
        "drop_before": attempts[0]["drop"],
        "int8_accuracy": accuracy,
        "drop_after": round(drop, 6),
        "attempts": len(attempts),
        "excluded_nodes": excluded,
        "ranked_nodes": len(ranking),
        "ranking": ranking[:SHOWN],
        "history": attempts,
        # False when every quantised node had to stay in float: the file then holds no INT8 at all
        "int8_left": is_quantized(onnx.load(str(target), load_external_data=False)),
    }
    return info


def ort_latency_ms(path: Path, frame: np.ndarray, warmup: int = 5, iterations: int = 30) -> float:
    """Median latency (ms) of one-frame calls of the model at ``path`` in ONNX Runtime on one CPU thread.

    A quick figure to compare the rungs of the accuracy ladder with one another; the profile stage
    measures the deployed artifact properly.
    """
    import time

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(frame[None], dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1e3, 4)
