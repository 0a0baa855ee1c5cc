"""The built-in detection set: cluttered scenes of shapes and handwritten digits, no download.

Every scene is a ``size`` x ``size`` RGB image (128 by default) holding 1 to 6 objects on a
cluttered, noisy background, deterministic from the seed and the scene's index:

- background: a random base colour with a linear gradient, 2-6 soft Gaussian blobs of other colours,
  3-9 thin random line segments, and (over the whole scene, objects included) Gaussian pixel noise;
- objects, each filled or outlined (a stroke of 2+ pixels) in a colour that contrasts with the
  background under it, at a random scale (11 % to 34 % of the side), placed so that no two boxes
  overlap by more than IoU :data:`MAX_IOU`:

  ========  ==========================================================================
  class     object
  ========  ==========================================================================
  0-2       ``circle``, ``square``, ``triangle`` (pointing up or down)
  3-12      ``digit-0`` .. ``digit-9``: scikit-learn's 8x8 handwritten digits (the UCI
            "Optical Recognition of Handwritten Digits" set) upscaled bilinearly
  ========  ==========================================================================

Each box is tight around its object's pixels (the extent of its mask). The train and held-out
(``val``) scenes come from independent random streams, and their digits from disjoint halves of
scikit-learn's images (80 % / 20 %, seeded), so a val digit is a glyph the model never saw.

:func:`write_synthetic` writes each split as JPEG images plus a COCO ``annotations.json`` (the path
user data takes, :mod:`edgekd.detection.coco`) and :func:`load_synthetic` reads them back. The
scene layout follows the synthetic "shapes" sets long used to test detectors cheaply (e.g. the
Matterport Mask R-CNN "shapes" sample), with digits and clutter added so that it takes a real
detector, not a colour threshold, to find the objects.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekd.atomic import write_bytes, write_json
from edgekd.data.base import seeded_rng
from edgekd.detection.coco import load_coco
from edgekd.detection.data import DetectionDataset
from edgekd.errors import DataError

SYNTHETIC_VERSION = 1  # bump when the scenes change: a written set of another version is regenerated
SHAPES = ("circle", "square", "triangle")
CLASSES = [*SHAPES, *(f"digit-{d}" for d in range(10))]
SCENE_SIZE = 128
MIN_OBJECTS, MAX_OBJECTS = 1, 6
SCALE = (0.11, 0.34)  # object side as a fraction of the scene side
MAX_IOU = 0.1  # largest IoU between two objects' boxes in a scene
PLACEMENT_TRIES = 30  # attempts to place an object before it is left out (never the first)
MIN_CONTRAST = 0.3  # mean absolute RGB difference between an object and the background under it
DIGIT_VAL_SHARE = 0.2  # share of scikit-learn's digits kept for the val scenes
GENERATOR = "edgekd synthetic detection scenes"


@dataclass
class Scene:
    """One rendered scene: uint8 (H, W, 3) pixels, boxes (K, 4) x0, y0, x1, y1 (pixel edges), labels (K,).

    ``masks`` (K, H, W) and ``background`` (the scene before objects and noise, float [0, 1]) and
    ``clean`` (after the objects, before the noise) are kept for tests when asked for.
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None = None
    background: np.ndarray | None = None
    clean: np.ndarray | None = None


def digit_pools(seed: int) -> dict[str, np.ndarray]:
    """scikit-learn's digits as float [0, 1] 8x8 images, split into disjoint train and val pools.

    Returns ``{"train": images, "val": images, "train_labels": ..., "val_labels": ...}``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    order = seeded_rng(seed, "detection-digits").permutation(len(images))
    n_val = round(len(images) * DIGIT_VAL_SHARE)
    parts = {"val": order[:n_val], "train": order[n_val:]}
    pools: dict[str, np.ndarray] = {}
    for name, index in parts.items():
        pools[name] = images[index]
        pools[f"{name}_labels"] = np.asarray(bunch.target, dtype=np.int64)[index]
    return pools


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` eroded by a 3x3 cross ``steps`` times (pixels outside the patch count as off)."""
    out = mask.copy()
    for _ in range(steps):
        padded = np.pad(out, 1)
        out = out & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return out


def _shape_mask(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5  # pixel centres
    if kind == "circle":
        centre = side / 2
        return (xx - centre) ** 2 + (yy - centre) ** 2 <= centre**2
    if kind == "square":
        return np.ones((side, side), dtype=bool)
    # triangle: apex at the top centre, base along the bottom edge; flipped half of the time
    half = side / 2
    inside = (yy >= 2 * np.abs(xx - half)) & (yy <= side)
    return inside[::-1] if rng.random() < 0.5 else inside


def _digit_mask(glyph: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """An 8x8 digit in [0, 1] upscaled to ``side``: (alpha in [0, 1], mask = alpha > 0)."""
    from PIL import Image

    large = np.asarray(Image.fromarray(glyph, mode="F").resize((side, side), Image.Resampling.BILINEAR))
    alpha = np.clip((large - 0.25) / 0.35, 0.0, 1.0)
    return alpha, alpha > 0


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    for _ in range(12):
        colour = rng.random(3).astype(np.float32)
        if np.abs(colour - under).mean() >= MIN_CONTRAST:
            return colour
    return (under < 0.5).astype(np.float32)  # black or white per channel: always contrasting


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = axis[:, None], axis[None, :]
    base = rng.uniform(0.15, 0.85, 3).astype(np.float32)
    direction = rng.normal(size=2).astype(np.float32)
    gradient = (xx * direction[0] + yy * direction[1])[None] * rng.uniform(-0.25, 0.25, (3, 1, 1))
    canvas = base[:, None, None] + gradient.astype(np.float32)
    for _ in range(int(rng.integers(2, 7))):
        cx, cy = rng.random(2)
        sigma = rng.uniform(0.04, 0.18)
        rows = np.exp(-((axis - cy) ** 2) / (2 * sigma**2))
        cols = np.exp(-((axis - cx) ** 2) / (2 * sigma**2))
        canvas += np.outer(rows, cols)[None] * rng.uniform(-0.35, 0.35, (3, 1, 1)).astype(np.float32)
    for _ in range(int(rng.integers(3, 10))):
        (x0, y0), (x1, y1) = rng.uniform(0, size - 1, (2, 2))
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        t = np.linspace(0.0, 1.0, steps)
        cols = np.round(x0 + (x1 - x0) * t).astype(np.int64)
        rows = np.round(y0 + (y1 - y0) * t).astype(np.int64)
        canvas[:, rows, cols] = rng.random(3).astype(np.float32)[:, None]
    return np.clip(canvas, 0.0, 1.0)


def _iou(box: np.ndarray, others: list[np.ndarray]) -> float:
    if not others:
        return 0.0
    rest = np.asarray(others)
    ix = np.clip(np.minimum(box[2], rest[:, 2]) - np.maximum(box[0], rest[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], rest[:, 3]) - np.maximum(box[1], rest[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    union = area + (rest[:, 2] - rest[:, 0]) * (rest[:, 3] - rest[:, 1]) - inter
    return float((inter / union).max())


def render_scene(
    rng: np.random.Generator, size: int, digits: np.ndarray, digit_labels: np.ndarray, debug: bool = False
) -> Scene:
    """One scene drawn from ``rng``; its digits come from ``digits`` (float (M, 8, 8)), ``digit_labels``."""
    canvas = _background(rng, size)
    background = canvas.copy() if debug else None
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    masks: list[np.ndarray] = []
    wanted = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    for _ in range(wanted):
        label = int(rng.integers(len(CLASSES)))
        side = int(rng.integers(round(SCALE[0] * size), round(SCALE[1] * size) + 1))
        outlined = rng.random() < 0.4
        if label < len(SHAPES):
            mask = _shape_mask(SHAPES[label], side, rng)
            alpha = mask.astype(np.float32)
        else:
            choices = np.flatnonzero(digit_labels == label - len(SHAPES))
            glyph = digits[choices[int(rng.integers(len(choices)))]]
            alpha, mask = _digit_mask(glyph, side)
            outlined = False  # a digit is a stroke already
        if outlined:
            stroke = max(2, side // 8)
            mask = mask & ~_erode(mask, stroke)
            alpha = mask.astype(np.float32)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        tight = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)  # in the patch
        for _ in range(PLACEMENT_TRIES):
            x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
            box = tight + [x, y, x, y]
            if _iou(box, boxes) <= MAX_IOU:
                break
        else:
            continue
        region = canvas[:, y : y + side, x : x + side]
        colour = _contrasting_colour(rng, region[:, mask].mean(axis=1))
        region[:] = region * (1 - alpha) + colour[:, None, None] * alpha
        boxes.append(box)
        labels.append(label)
        if debug:
            full = np.zeros((size, size), dtype=bool)
            full[y : y + side, x : x + side] = mask
            masks.append(full)
    clean = canvas.copy() if debug else None
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(rng.uniform(0.02, 0.07))
    image = np.round(np.clip(canvas, 0.0, 1.0) * 255).astype(np.uint8).transpose(1, 2, 0)
    return Scene(
        image=image,
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        masks=np.asarray(masks).reshape(-1, size, size) if debug else None,
        background=background,
        clean=clean,
    )


def scenes(seed: int, split: str, count: int, size: int = SCENE_SIZE, debug: bool = False) -> list[Scene]:
    """The first ``count`` scenes of ``split`` ("train" or "val"); scene ``i`` is the same for any count."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    pools = digit_pools(seed)
    digits, digit_labels = pools[split], pools[f"{split}_labels"]
    return [
        render_scene(seeded_rng(seed, f"detection-scene-{split}-{i}"), size, digits, digit_labels, debug)
        for i in range(count)
    ]


def _settings(seed: int, split: str, count: int, size: int) -> dict:
    return {
        "generator": GENERATOR,
        "version": SYNTHETIC_VERSION,
        "seed": seed,
        "split": split,
        "count": count,
        "size": size,
    }


def _jpeg(image: np.ndarray) -> bytes:
    """JPEG at quality 95 without chroma subsampling: noisy scenes barely compress losslessly (a PNG
    is 4x larger and 10x slower to write), and COCO's own images are JPEG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


def _written(annotations: Path, settings: dict) -> bool:
    try:
        return json.loads(annotations.read_text(encoding="utf-8")).get("info") == settings
    except (OSError, ValueError, AttributeError):
        return False


def write_split(root: str | Path, seed: int, split: str, count: int, size: int = SCENE_SIZE) -> Path:
    """Write ``count`` scenes of ``split`` under ``root/<split>/`` (JPEG images and annotations.json).

    A split already written with the same settings (the json's ``info``) is kept as is. The json
    is written last, so a killed run leaves no json and is redone. Returns the json's path.
    """
    if count < 1:
        raise DataError(f"synthetic detection: {split} count {count} must be at least 1; raise it")
    folder = Path(root) / split
    annotations = folder / "annotations.json"
    settings = _settings(seed, split, count, size)
    if _written(annotations, settings):
        return annotations
    images, records = [], []
    for index, scene in enumerate(scenes(seed, split, count, size)):
        name = f"images/{index:06d}.jpg"
        write_bytes(folder / name, _jpeg(scene.image))
        images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
        for box, label in zip(scene.boxes, scene.labels, strict=True):
            x0, y0, x1, y1 = (float(v) for v in box)
            records.append(
                {
                    "id": len(records) + 1,
                    "image_id": index + 1,
                    "category_id": int(label),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": name} for i, name in enumerate(CLASSES)]
    write_json(
        annotations, {"info": settings, "images": images, "annotations": records, "categories": categories}
    )
    return annotations


def write_synthetic(
    root: str | Path, seed: int, train: int = 2000, val: int = 400, size: int = SCENE_SIZE
) -> dict[str, Path]:
    """Write the train and val splits under ``root`` (see :func:`write_split`); their json paths."""
    return {
        split: write_split(root, seed, split, count, size)
        for split, count in (("train", train), ("val", val))
    }


def load_synthetic(
    root: str | Path,
    seed: int,
    image_size: int = SCENE_SIZE,
    train: int = 2000,
    val: int = 400,
    scene_size: int = SCENE_SIZE,
) -> tuple[DetectionDataset, DetectionDataset]:
    """(train, val) of the built-in set: written under ``root`` if not yet, read back as COCO data."""
    paths = write_synthetic(root, seed, train, val, scene_size)
    train_set, val_set = (load_coco(paths[split], image_size) for split in ("train", "val"))
    return train_set, val_set
