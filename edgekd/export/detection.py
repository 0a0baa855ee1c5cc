"""ONNX export of a detector (DETR, :mod:`edgekd.models.detr`) and its parity check on both outputs.

The exported graph has one input (``input``, (B, 3, S, S), dynamic batch) and two named outputs,
``logits`` (B, Q, C) (sigmoid class logits, Carion et al., "End-to-End Object Detection with
Transformers", ECCV 2020, with the focal classification of DAB-DETR) and ``boxes`` (B, Q, 4), (cx, cy,
w, h) in [0, 1] of the input: what :func:`edgekd.detection.metrics.postprocess` and the numpy device
runner read. The model's ``for_export()`` gives the module with exactly these two outputs.

Parity is checked as for classifiers (:func:`edgekd.export.onnx.check_parity`: the whole held-out
set as one batch, then the first images at batch 1, proving the batch axis dynamic), on both
outputs: the logits against ``export.tolerance`` and the boxes too (they are sigmoid outputs in
[0, 1], so the same absolute tolerance is a fraction of the image side). The record also gives
the share of (query, best class) pairs that agree, the detection counterpart of top-1 agreement.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edgekd.errors import ExportError
from edgekd.export.onnx import (
    INPUT_NAME,
    PARITY_SMALL_BATCH,
    PARITY_SMALL_RUNS,
    _abs_diff,
    _first_line,
    _non_finite,
    _parity_session,
    _refuse_non_finite,
    cpu_eval,
    export_onnx,
)

if TYPE_CHECKING:
    from torch import nn

DETECTION_OUTPUTS = ("logits", "boxes")


def export_module(model: nn.Module) -> nn.Module:
    """The module to export: ``model.for_export()`` (a DETR), or ``model`` when it already returns
    the ``(logits, boxes)`` pair (e.g. a :class:`~edgekd.models.detr.DETRExport`)."""
    for_export = getattr(model, "for_export", None)
    return for_export() if callable(for_export) else model


def export_detector(
    model: nn.Module,
    input_shape: tuple[int, ...],
    path: str | os.PathLike[str],
    opset: int = 18,
    dynamo: bool = True,
) -> dict:
    """Export a detector to one ONNX file with outputs ``logits`` and ``boxes`` (dynamic batch).

    Returns :func:`~edgekd.export.onnx.export_onnx`'s record with ``task: "detection"``.
    """
    module = export_module(model)
    info = export_onnx(module, input_shape, path, opset=opset, dynamo=dynamo, output_names=DETECTION_OUTPUTS)
    names = [output["name"] for output in info["outputs"]]
    if names != list(DETECTION_OUTPUTS):
        raise ExportError(
            f"cannot export {type(model).__name__} as a detector: the ONNX outputs are {names}, expected "
            f"{list(DETECTION_OUTPUTS)}; its export module must return (logits, boxes)"
        )
    return {**info, "task": "detection"}


def _torch_outputs(model: nn.Module, data: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    with cpu_eval(export_module(model)) as module, torch.inference_mode():
        produced = module(torch.from_numpy(data.copy()))
    if not isinstance(produced, tuple | list) or len(produced) != len(DETECTION_OUTPUTS):
        raise ExportError(
            f"parity check: {type(model).__name__}'s export module must return (logits, boxes), got "
            f"{type(produced).__name__}"
        )
    return {name: value.numpy() for name, value in zip(DETECTION_OUTPUTS, produced, strict=True)}


def check_detection_parity(
    model: nn.Module, onnx_path: str | os.PathLike[str], samples: np.ndarray, tolerance: float
) -> dict:
    """Compare ONNX Runtime (CPU) with PyTorch on both outputs of a detector, on real ``samples``.

    Returns ``{max_abs_diff, mean_abs_diff, outputs: {logits: {max_abs_diff, mean_abs_diff},
    boxes: {...}}, samples, batch_sizes, class_agreement, tolerance, passed}``; ``max_abs_diff`` is
    the larger of the two outputs'. Raises ExportError above tolerance on either output, and when
    either runtime outputs NaN or infinity.
    """
    path = Path(onnx_path)
    data = np.ascontiguousarray(samples, dtype=np.float32)
    if data.ndim != 4 or len(data) == 0:
        raise ExportError(
            f"parity check of {path}: need images shaped (N, C, H, W) with N >= 1, got {data.shape}"
        )
    session = _parity_session(path, data, tolerance, "images")
    expected = _torch_outputs(model, data)
    names = list(DETECTION_OUTPUTS)
    small = data[:PARITY_SMALL_RUNS]
    try:
        full = dict(zip(names, session.run(names, {INPUT_NAME: data}), strict=True))
        runs = [session.run(names, {INPUT_NAME: small[i : i + 1]}) for i in range(len(small))]
    except Exception as exc:
        raise ExportError(
            f"parity check: {path} fails on images of shape {data.shape} or batch {PARITY_SMALL_BATCH} "
            f"({_first_line(str(exc))}); is the batch axis dynamic and are its outputs {names}?"
        ) from exc
    singles = {name: np.concatenate([run[i] for run in runs]) for i, name in enumerate(names)}
    bad_torch = sum(_non_finite(v) for v in expected.values())
    bad_ort = sum(_non_finite(full[n]) + _non_finite(singles[n]) for n in names)
    _refuse_non_finite(model, path, bad_torch, bad_ort, f"{len(data)} images")
    per_output: dict[str, dict[str, float]] = {}
    for name in names:
        if full[name].shape != expected[name].shape:
            raise ExportError(
                f"parity check: {path} output {name} has shape {full[name].shape}, PyTorch "
                f"{expected[name].shape}"
            )
        diff_full = _abs_diff(full[name], expected[name])
        diff_small = _abs_diff(singles[name], expected[name][: len(small)])
        per_output[name] = {
            "max_abs_diff": float(max(diff_full.max(), diff_small.max())),
            "mean_abs_diff": float(diff_full.mean()),
        }
    max_abs = max(v["max_abs_diff"] for v in per_output.values())
    agreement = float(np.mean(full["logits"].argmax(-1) == expected["logits"].argmax(-1)))
    report: dict[str, Any] = {
        "max_abs_diff": max_abs,
        "mean_abs_diff": float(np.mean([v["mean_abs_diff"] for v in per_output.values()])),
        "outputs": per_output,
        "samples": len(data),
        "batch_sizes": [len(data), PARITY_SMALL_BATCH],
        "class_agreement": agreement,
        "tolerance": tolerance,
        "passed": max_abs <= tolerance,
    }
    if not report["passed"]:
        worst = max(per_output, key=lambda n: per_output[n]["max_abs_diff"])
        ops = sorted({node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node})
        raise ExportError(
            f"{path}: ONNX Runtime vs PyTorch max |diff| {max_abs:.3g} on output {worst} > tolerance "
            f"{tolerance:.3g} (class agreement {agreement:.3f} over {len(data)} images); raise "
            f"export.tolerance or check ops {', '.join(ops)}"
        )
    return report
