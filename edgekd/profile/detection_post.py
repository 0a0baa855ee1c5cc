"""A detector's post-processing, numpy only: what the bundle's manifest records and a device applies.

Device-side code (imports numpy and the standard library only), shipped to a remote device with the
runner, and the one implementation :func:`edgekd.detection.metrics.postprocess` wraps, so the host's
and the device's detections are the same numbers.

The recipe (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020, for the
softmax "no object" form; Zhu et al., "Deformable DETR", ICLR 2021 and Liu et al., "DAB-DETR",
ICLR 2022 for the sigmoid form): a DETR outputs per query class ``logits`` (B, Q, C) and ``boxes``
(B, Q, 4), (cx, cy, w, h) in [0, 1] of the S x S letterboxed input. With ``activation="sigmoid"``
every (query, class) pair is a candidate scored ``sigmoid(logit)``; the ``top_k`` best over all
Q x C pairs that score at least ``score_threshold`` are the detections. No NMS (DETR's set
prediction does not need it). Boxes map back to the original image's pixels with the image's
letterbox record (:func:`to_original_pixels`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

TOP_K = 100  # COCO's maxDets for the reported AP
SCORE_THRESHOLD = 0.0  # every candidate counts for COCO's AP; an application raises it
ACTIVATION = "sigmoid"
BOX_FORMAT = "cxcywh"


def spec(
    top_k: int = TOP_K, score_threshold: float = SCORE_THRESHOLD, activation: str = ACTIVATION
) -> dict[str, Any]:
    """The post-processing record of a bundle's manifest (``postprocessing``)."""
    return {
        "task": "detection",
        "outputs": {"logits": "(B, Q, C) class logits", "boxes": "(B, Q, 4) boxes"},
        "activation": activation,
        "top_k": int(top_k),
        "score_threshold": float(score_threshold),
        "box_format": BOX_FORMAT,
        "box_units": "fractions of the S x S letterboxed model input (cx, cy, w, h in [0, 1])",
        "nms": None,
        "letterbox": {
            "placement": "centre",
            "pad": "ImageNet mean colour (0 after normalisation)",
            "to_original": "x = (cx * S - pad_x) / scale_x, y = (cy * S - pad_y) / scale_y per image",
        },
    }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    exp = np.exp(x[~positive])
    out[~positive] = exp / (1.0 + exp)
    return out


def postprocess_arrays(
    logits: np.ndarray,
    boxes: np.ndarray,
    top_k: int = TOP_K,
    score_threshold: float = SCORE_THRESHOLD,
    activation: str = ACTIVATION,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image ``(boxes (K, 4) float32, scores (K,) float32, labels (K,) int64)``, best first.

    ``activation="softmax"``: the last of the C columns is DETR's "no object" class; each query's
    best other class is its label and score, the top-k taken over queries. Ties: lower query, then
    lower class first.
    """
    scores_in = np.asarray(logits).astype(np.float64)
    box_in = np.asarray(boxes).astype(np.float32)
    if scores_in.ndim != 3 or box_in.shape != (*scores_in.shape[:2], 4):
        raise ValueError(
            f"expected logits (B, Q, C) and boxes (B, Q, 4), got {scores_in.shape}, {box_in.shape}"
        )
    batch, queries, width = scores_in.shape
    results = []
    for b in range(batch):
        if activation == "sigmoid":
            flat = _sigmoid(scores_in[b]).reshape(-1)
            classes = width
        elif activation == "softmax":
            shifted = np.exp(scores_in[b] - scores_in[b].max(axis=1, keepdims=True))
            probs = shifted / shifted.sum(axis=1, keepdims=True)
            best = probs[:, :-1].argmax(axis=1)
            flat = np.full((queries, width - 1), -np.inf)
            flat[np.arange(queries), best] = probs[np.arange(queries), best]
            flat = flat.reshape(-1)
            classes = width - 1
        else:
            raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
        flat = np.where(np.isnan(flat), -np.inf, flat)
        order = np.argsort(-flat, kind="stable")[:top_k]
        order = order[flat[order] >= score_threshold]
        results.append(
            (box_in[b, order // classes], flat[order].astype(np.float32), (order % classes).astype(np.int64))
        )
    return results


def apply(logits: np.ndarray, boxes: np.ndarray, record: dict[str, Any]) -> list[tuple]:
    """:func:`postprocess_arrays` with the settings of a manifest's ``postprocessing`` record."""
    return postprocess_arrays(
        logits,
        boxes,
        top_k=int(record.get("top_k", TOP_K)),
        score_threshold=float(record.get("score_threshold", SCORE_THRESHOLD)),
        activation=str(record.get("activation", ACTIVATION)),
    )


def to_original_pixels(boxes: np.ndarray, letterbox: np.ndarray, size: int) -> np.ndarray:
    """Boxes (K, 4) cxcywh in [0, 1] of the S x S input → (x0, y0, x1, y1) pixels of the original image,
    with the image's letterbox record (scale_x, scale_y, pad_x, pad_y, ...)."""
    scale_x, scale_y, pad_x, pad_y = (float(v) for v in np.asarray(letterbox)[:4])
    cx, cy, w, h = (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * size).T
    return np.stack(
        [
            (cx - w / 2 - pad_x) / scale_x,
            (cy - h / 2 - pad_y) / scale_y,
            (cx + w / 2 - pad_x) / scale_x,
            (cy + h / 2 - pad_y) / scale_y,
        ],
        axis=1,
    ).astype(np.float32)


def pack(found: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, list]:
    """Many images' detections as flat JSON-ready lists: ``counts`` per image, then boxes, scores, labels.

    Values are the float32 ones exactly (not rounded): the host re-scores them and must rank them as the
    device did (scores of a weak detector differ in the 7th digit)."""
    return {
        "counts": [len(scores) for _, scores, _ in found],
        "boxes": [[float(v) for v in box] for boxes, _, _ in found for box in boxes],
        "scores": [float(s) for _, scores, _ in found for s in scores],
        "labels": [int(label) for _, _, labels in found for label in labels],
    }


def unpack(packed: dict[str, list]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Inverse of :func:`pack`."""
    boxes = np.asarray(packed["boxes"], dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(packed["scores"], dtype=np.float32)
    labels = np.asarray(packed["labels"], dtype=np.int64)
    out, start = [], 0
    for count in packed["counts"]:
        out.append(
            (boxes[start : start + count], scores[start : start + count], labels[start : start + count])
        )
        start += count
    return out


class OutputsRunner:
    """A detection artifact on ONNX Runtime or OpenVINO (CPU) returning ``(logits, boxes)`` by name.

    Device-side: imports only the runtime (the backends' runners return the first output alone).
    TensorRT: ``loaded`` is the engine's :class:`~edgekd.backends.tensorrt.TensorRtRunner` (built on
    the device), run at batch 1 (inside every engine's optimisation profile), both outputs by name.
    """

    def __init__(self, path: str, backend: str, threads: int | None = None, loaded: Any = None) -> None:
        self.backend = backend
        self.batch_limit: int | None = None
        if backend == "tensorrt" and loaded is not None:
            self._loaded, self.batch_limit = loaded, 1
        elif backend == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = int(threads)
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name
        elif backend == "openvino":
            import openvino as ov

            config = {"INFERENCE_NUM_THREADS": int(threads)} if threads else {}
            self._compiled = ov.Core().compile_model(str(path), "CPU", config)
        else:
            raise ValueError(f"no detection outputs runner for backend {backend!r}")

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        array = np.ascontiguousarray(batch, dtype=np.float32)
        if self.backend == "tensorrt":
            parts = []
            for start in range(0, len(array), self.batch_limit or 1):
                self._loaded.run(array[start : start + (self.batch_limit or 1)])
                named = self._loaded.named_outputs()
                parts.append((named["logits"], named["boxes"]))
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if self.backend == "onnxruntime":
            logits, boxes = self._session.run(["logits", "boxes"], {self._input: array})
            return logits, boxes
        result = self._compiled(array)
        return result[self._compiled.output("logits")], result[self._compiled.output("boxes")]


def ground_truth(arrays: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per image boxes and labels from a detection eval set's flattened ``gt_*`` arrays."""
    boxes, labels, start = [], [], 0
    for count in np.asarray(arrays["gt_counts"]).tolist():
        boxes.append(np.asarray(arrays["gt_boxes"][start : start + count], dtype=np.float32))
        labels.append(np.asarray(arrays["gt_labels"][start : start + count], dtype=np.int64))
        start += count
    return boxes, labels


def detect(runner: OutputsRunner, images: np.ndarray, record: dict[str, Any], batch_size: int) -> list[tuple]:
    """Post-processed detections (``record``: the manifest's ``postprocessing``) over ``images``."""
    found: list[tuple] = []
    for start in range(0, len(images), batch_size):
        logits, boxes = runner.outputs(images[start : start + batch_size])
        found += apply(logits, boxes, record)
    return found


def score(arrays: dict[str, np.ndarray], found: list[tuple], classes: list[str]) -> dict[str, Any] | None:
    """COCO mAP of ``found`` on the eval set, when faster-coco-eval is installed here (else None: the
    row carries the packed detections, for the host to score)."""
    try:
        from edgekd.detection.metrics import Detections, evaluate
    except ImportError:
        return None
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return None
    boxes, labels = ground_truth(arrays)
    size = int(np.asarray(arrays["x"]).shape[-1])
    scores = evaluate(boxes, labels, [Detections(*item) for item in found], classes, size)

    def finite(value: float) -> float | None:
        return None if value != value else float(value)  # NaN: no object

    return {
        "metric": "COCO mAP@[.5:.95] (faster-coco-eval)",
        "accuracy": finite(scores.map),
        "map": finite(scores.map),
        "map50": finite(scores.map50),
        "n": scores.images,
        "objects": scores.objects,
        "agreement": None,
    }
