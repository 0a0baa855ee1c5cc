"""Detection metrics: COCO mAP@[.5:.95] and mAP@.5 (overall and per class), agreement mAP, post-processing.

The numbers are COCO's own (Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014):
average precision over 101 recall points, at IoU thresholds 0.50:0.05:0.95, at most 100 detections
per image, averaged over the classes that have ground truth; computed by ``faster-coco-eval``, a
C++ reimplementation of pycocotools' ``COCOeval`` that gives the same results. Boxes are scored in
pixels of the square model input (side ``image_size``), so COCO's small/medium/large areas refer
to that frame; the reported numbers use all areas.

Agreement (:func:`agreement`): the mAP of a compiled artifact's detections against the PyTorch
model's own confident detections taken as ground truth, the detection counterpart of the
classification agreement (top-1 equality with the float model): 1.0 when the artifact reproduces
the model, whatever the model's accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # numpy only at run time: a device runner imports this module without torch
    from edgekd.detection.data import DetectionDataset

MAX_DETECTIONS = 100  # COCO's maxDets for the reported AP
AGREEMENT_MIN_SCORE = 0.5  # a reference detection at or above this score counts as an object


@dataclass
class Detections:
    """One image's detections: boxes (K, 4) cx, cy, w, h in [0, 1] of the model input, scores, labels."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if not len(self.boxes) == len(self.scores) == len(self.labels):
            raise ValueError(
                f"boxes, scores and labels differ in length: {len(self.boxes)}, {len(self.scores)}, "
                f"{len(self.labels)}"
            )

    def __len__(self) -> int:
        return len(self.scores)

    def above(self, min_score: float) -> Detections:
        keep = self.scores >= min_score
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])


@dataclass
class DetectionScores:
    """COCO mAP@[.5:.95] (``map``) and mAP@.5 (``map50``), per class too (NaN: no objects of the class)."""

    map: float
    map50: float
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> map, map50, objects
    images: int = 0
    objects: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def postprocess(
    logits: np.ndarray,
    boxes: np.ndarray,
    top_k: int = MAX_DETECTIONS,
    score_threshold: float = 0.0,
    activation: str = "sigmoid",
) -> list[Detections]:
    """Per image, the ``top_k`` best detections scoring at least ``score_threshold``.

    ``logits`` (B, Q, C) and ``boxes`` (B, Q, 4, cxcywh in [0, 1]) are a DETR's outputs (numpy or
    torch). ``activation="sigmoid"``: each (query, class) pair is a candidate scored
    ``sigmoid(logit)``, the top-k taken over all Q x C pairs, as for the sigmoid focal-loss
    classifiers of Deformable DETR (Zhu et al., ICLR 2021) and DAB-DETR (Liu et al., ICLR 2022).
    ``activation="softmax"``: the last of the C columns is DETR's "no object" class (Carion et al.,
    ECCV 2020); each query's best other class is its label and score, the top-k taken over queries.
    Sorted by score, highest first (ties: lower query, then lower class first). The arithmetic is
    :func:`edgekd.profile.detection_post.postprocess_arrays` (numpy only), which a device runs too.
    """
    from edgekd.profile.detection_post import postprocess_arrays

    found = postprocess_arrays(_numpy(logits), _numpy(boxes), top_k, score_threshold, activation)
    return [Detections(b, s, lab) for b, s, lab in found]


def _numpy(value: object) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().float().numpy()  # type: ignore[attr-defined]
    return np.asarray(value)


def _xywh(boxes: np.ndarray, image_size: int) -> np.ndarray:
    cx, cy, w, h = (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * image_size).T
    return np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)


def evaluate(
    gt_boxes: Sequence[np.ndarray],
    gt_labels: Sequence[np.ndarray],
    detections: Sequence[Detections],
    classes: Sequence[str],
    image_size: int,
) -> DetectionScores:
    """COCO mAP of ``detections`` against the ground truth (per image boxes cxcywh in [0, 1], labels).

    Every image counts, with or without objects (its detections are then false positives). With no
    ground-truth object at all, every number is NaN.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    if not len(gt_boxes) == len(gt_labels) == len(detections):
        raise ValueError(
            f"ground truth for {len(gt_boxes)} images ({len(gt_labels)} label arrays) but detections "
            f"for {len(detections)}"
        )
    images, annotations, results = [], [], []
    counts = np.zeros(len(classes), dtype=np.int64)
    for index, (boxes, labels, found) in enumerate(zip(gt_boxes, gt_labels, detections, strict=True)):
        image_id = index + 1
        images.append({"id": image_id, "width": image_size, "height": image_size})
        for box, label in zip(_xywh(boxes, image_size), np.asarray(labels).reshape(-1), strict=True):
            counts[int(label)] += 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
        for box, score, label in zip(_xywh(found.boxes, image_size), found.scores, found.labels, strict=True):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
            )
    per_class = {
        name: {"map": math.nan, "map50": math.nan, "objects": int(counts[i])}
        for i, name in enumerate(classes)
    }
    total = int(counts.sum())
    if not total:
        return DetectionScores(math.nan, math.nan, per_class, len(images), 0)
    quiet = {"print_function": lambda *args, **kwargs: None}
    categories = [{"id": i, "name": name} for i, name in enumerate(classes)]
    truth = COCO({"images": images, "annotations": annotations, "categories": categories}, **quiet)
    predicted = truth.loadRes(results) if results else truth.loadRes([])
    evaluator = COCOeval_faster(truth, predicted, "bbox", **quiet)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    precision = np.asarray(
        evaluator.eval["precision"]
    )  # (IoU thresholds, recall points, classes, areas, maxDets)
    ious = np.asarray(evaluator.params.iouThrs)
    at50 = int(np.argmin(np.abs(ious - 0.5)))
    for i, name in enumerate(classes):
        if counts[i]:
            every = precision[:, :, i, 0, -1]
            per_class[name]["map"] = float(np.mean(every[every > -1])) if np.any(every > -1) else 0.0
            half = every[at50]
            per_class[name]["map50"] = float(np.mean(half[half > -1])) if np.any(half > -1) else 0.0
    stats = [float(v) for v in evaluator.stats[:2]]
    overall = [v if v >= 0 else math.nan for v in stats]
    return DetectionScores(overall[0], overall[1], per_class, len(images), total)


def evaluate_dataset(data: DetectionDataset, detections: Sequence[Detections]) -> DetectionScores:
    """COCO mAP of ``detections`` on ``data`` (one entry per image, same order)."""
    return evaluate(data.boxes, data.labels, detections, data.classes, data.image_size)


def agreement(
    reference: Sequence[Detections],
    candidate: Sequence[Detections],
    classes: Sequence[str],
    image_size: int,
    min_score: float = AGREEMENT_MIN_SCORE,
) -> DetectionScores:
    """COCO mAP of ``candidate`` (an artifact's detections) against ``reference`` (the PyTorch model's).

    The reference detections scoring at least ``min_score`` are the ground truth; the candidate's
    are scored as usual. NaN when the reference finds nothing that confident.
    """
    truth = [found.above(min_score) for found in reference]
    return evaluate([t.boxes for t in truth], [t.labels for t in truth], candidate, classes, image_size)
