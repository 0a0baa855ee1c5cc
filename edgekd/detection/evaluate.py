"""Evaluate a detector or a compiled detection artifact on held-out images: COCO mAP, mAP@.5, agreement.

The same evaluation runs for the PyTorch teacher and student and for every artifact (ONNX Runtime,
OpenVINO), so their numbers compare: outputs in batches, :func:`edgekd.detection.metrics.postprocess`
(top 100 per image, no score threshold: COCO's protocol; Lin et al., "Microsoft COCO: Common Objects
in Context", ECCV 2014), then mAP@[.5:.95] and mAP@.5 against the ground truth and, given the PyTorch
student's own detections, agreement mAP (:func:`edgekd.detection.metrics.agreement`: the artifact
scored against the student's confident detections taken as ground truth; 1.0 when it reproduces them).

The record mirrors the classification one (:func:`edgekd.profile.accuracy.evaluate_logits`) where
the pipeline reads it: ``accuracy`` is the mAP@[.5:.95] (so the deployment decision's budget is on
the mAP drop) and ``agreement`` is the agreement mAP; NaN (no object at all) is written as None.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgekd.backends.signal_stack import compile_on_cpu
from edgekd.backends.torch import TorchRunner
from edgekd.detection.metrics import Detections, agreement, evaluate_dataset, postprocess
from edgekd.profile.detection_post import ACTIVATION, SCORE_THRESHOLD, TOP_K

EVAL_BATCH = 32
OUTPUTS = ("logits", "boxes")


class DetectionRunner(Protocol):
    """A loaded detector: ``outputs`` maps images (B, 3, S, S) to ``(logits (B, Q, C), boxes (B, Q, 4))``."""

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class TorchDetector(TorchRunner):
    """A PyTorch DETR (or its export module) on the CPU, eval mode; ``run`` gives the logits (latency)."""

    def __init__(self, model: Any, threads: int | None = None) -> None:
        from edgekd.export.detection import export_module

        super().__init__(export_module(model), threads)
        self.module = self.model
        self.info["model_class"] = type(model).__name__

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tensor = self._input(batch)
        with self._torch.inference_mode():
            logits, boxes = self.module(tensor)
        return logits.numpy(), boxes.numpy()

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.outputs(batch)[0]


class OrtDetector:
    """An ONNX Runtime CPU session of a detection ONNX file (FP32 or QDQ INT8), both outputs by name."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from edgekd.backends.onnxruntime import cpu_session

        self.path = Path(path)
        self._session = cpu_session(self.path, threads)
        self._input = self._session.get_inputs()[0].name
        self.info = {"backend": "onnxruntime", "artifact": str(self.path)}

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, boxes = self._session.run(list(OUTPUTS), {self._input: np.asarray(batch, dtype=np.float32)})
        return logits, boxes


class OpenVinoDetector:
    """An OpenVINO IR (or ONNX) compiled for the CPU; both outputs by name."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:

        self.path = Path(path)
        config = {"INFERENCE_NUM_THREADS": int(threads)} if threads else {}
        self._compiled = compile_on_cpu(str(self.path), config)
        names = [output.get_any_name() for output in self._compiled.outputs]
        missing = [name for name in OUTPUTS if name not in names]
        if missing:
            from edgekd.errors import ModelError

            raise ModelError(f"{self.path}: outputs {names} lack {missing}; re-export the detector")
        self._outputs = [self._compiled.output(name) for name in OUTPUTS]
        self.info = {"backend": "openvino", "artifact": str(self.path)}

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self._compiled(np.ascontiguousarray(batch, dtype=np.float32))
        return result[self._outputs[0]], result[self._outputs[1]]


def artifact_detector(path: str | Path, backend: str, threads: int | None = None) -> DetectionRunner:
    """The detector runner of a compiled artifact ``path`` on ``backend`` (onnxruntime or openvino)."""
    from edgekd.errors import BackendUnavailable

    if backend == "onnxruntime":
        return OrtDetector(path, threads)
    if backend == "openvino":
        return OpenVinoDetector(path, threads)
    raise BackendUnavailable(
        f"{path}: detection artifacts are evaluated on onnxruntime and openvino here, not {backend!r}; "
        f"choose an x86 target (e.g. --target x86-openvino) to measure mAP on this machine"
    )


def predict(
    runner: DetectionRunner,
    images: np.ndarray,
    batch_size: int = EVAL_BATCH,
    top_k: int = TOP_K,
    score_threshold: float = SCORE_THRESHOLD,
    activation: str = ACTIVATION,
) -> list[Detections]:
    """Post-processed detections of ``runner`` on ``images`` (N, 3, S, S), one per image, in order."""
    found: list[Detections] = []
    for start in range(0, len(images), batch_size):
        logits, boxes = runner.outputs(np.ascontiguousarray(images[start : start + batch_size]))
        found += postprocess(logits, boxes, top_k, score_threshold, activation)
    return found


def _finite(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _per_class(scores: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    return {
        name: {key: (_finite(v) if key != "objects" else int(v)) for key, v in entry.items()}
        for name, entry in scores.items()
    }


def score_detections(
    data: Any, detections: list[Detections], reference: list[Detections] | None = None
) -> dict[str, Any]:
    """The evaluation record of ``detections`` on ``data`` (a DetectionDataset, same image order).

    ``{accuracy (= map), map, map50, per_class, n, objects, agreement, agreement_map50, metric}``;
    with ``reference`` (the PyTorch student's detections) the agreement mAP, else None.
    """
    scores = evaluate_dataset(data, detections)
    record: dict[str, Any] = {
        "metric": "COCO mAP@[.5:.95] (faster-coco-eval)",
        "accuracy": _finite(scores.map),
        "map": _finite(scores.map),
        "map50": _finite(scores.map50),
        "per_class": _per_class(scores.per_class),
        "n": scores.images,
        "objects": scores.objects,
        "agreement": None,
        "agreement_map50": None,
    }
    if reference is not None:
        agreed = agreement(reference, detections, data.classes, data.image_size)
        record["agreement"], record["agreement_map50"] = _finite(agreed.map), _finite(agreed.map50)
    return record


def evaluate_detector(
    runner: DetectionRunner,
    data: Any,
    reference: list[Detections] | None = None,
    batch_size: int = EVAL_BATCH,
) -> tuple[dict[str, Any], list[Detections]]:
    """Run ``runner`` over ``data``'s images, post-process, score: (record, detections)."""
    detections = predict(runner, data.images, batch_size)
    return score_detections(data, detections, reference), detections


def output_error(
    reference: DetectionRunner, candidate: DetectionRunner, images: np.ndarray, batch_size: int = EVAL_BATCH
) -> dict[str, float]:
    """Max and mean |candidate - reference| of the logits and of the boxes on ``images``."""
    diffs: dict[str, list[np.ndarray]] = {"logits": [], "boxes": []}
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start : start + batch_size])
        for name, a, b in zip(OUTPUTS, reference.outputs(batch), candidate.outputs(batch), strict=True):
            diffs[name].append(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).reshape(-1))
    out = {}
    for name, parts in diffs.items():
        joined = np.concatenate(parts)
        out[f"{name}_max_abs_diff"] = float(joined.max())
        out[f"{name}_mean_abs_diff"] = float(joined.mean())
    return out
