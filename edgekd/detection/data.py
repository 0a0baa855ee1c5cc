"""The in-memory detection dataset every detection source returns, and the image preprocessing it shares.

A source (the built-in scenes of :mod:`edgekd.detection.synthetic`, a COCO json read by
:mod:`edgekd.detection.coco`, an Ultralytics folder read by :mod:`edgekd.detection.yolo`) gives one
:class:`DetectionDataset`:

- ``images``: float32 (N, 3, S, S) with S = the requested side. Each image is decoded with Pillow,
  converted to RGB, divided by 255, *letterboxed* (its longer side resized to S with bilinear
  resampling, aspect ratio kept, centred on an S x S canvas whose padding is ImageNet's mean colour)
  and normalised per channel with ImageNet's mean and std exactly as
  :func:`edgekd.data.vision.normalise_images` does; the padding therefore reads 0 after normalisation.
- ``boxes``: per image a float32 (K, 4) array of (cx, cy, w, h) in [0, 1], relative to the S x S
  letterboxed input (the frame the model sees), the format DETR predicts (Carion et al., "End-to-End
  Object Detection with Transformers", ECCV 2020).
- ``labels``: per image an int64 (K,) array of class indices 0..C-1 into ``classes``.
- ``letterbox``: per image (scale_x, scale_y, pad_x, pad_y, width, height) to map boxes back to its pixels.
- ``fingerprint``: sha256 of the files' content and the loading settings (a stage cache key).

Every bad input raises :class:`~edgekd.errors.DataError` with one line naming the file, field and
value at fault and what to do.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekd.data.base import MIN_CLASSES, check_memory, seeded_rng
from edgekd.data.vision import IMAGENET_MEAN, image_normalisation, normalise_images
from edgekd.errors import DataError

# A box may reach this fraction of the image side beyond its border (rounding in annotation tools,
# e.g. COCO's own boxes end up to a pixel outside) before it counts as outside the image; within it,
# the box is clipped to the image.
BOX_TOLERANCE = 0.01
# Boxes smaller than this (in pixels of the original image, either side) are degenerate.
MIN_BOX_PIXELS = 1e-3
LETTERBOX = (
    "longer side resized to S (PIL BILINEAR, aspect kept), centred on an S x S canvas padded with "
    "ImageNet's mean colour (0 after normalisation)"
)


@dataclass
class DetectionDataset:
    """Letterboxed, normalised images with their boxes (cxcywh in [0, 1]) and labels (0..C-1)."""

    images: np.ndarray  # float32 (N, 3, S, S), normalised (see the module docstring)
    boxes: list[np.ndarray]  # N arrays float32 (K_i, 4): cx, cy, w, h in [0, 1] of the S x S input
    labels: list[np.ndarray]  # N arrays int64 (K_i,): indices into classes
    classes: list[str]
    names: list[str]  # per image: its file, relative to the source's root
    letterbox: np.ndarray  # float32 (N, 6): scale_x, scale_y, pad_x, pad_y, original width, height
    fingerprint: str = ""
    source: str = ""
    normalisation: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {len(self.images), len(self.boxes), len(self.labels), len(self.names), len(self.letterbox)}
        if len(lengths) != 1:
            raise ValueError(
                f"images, boxes, labels, names and letterbox differ in length: {sorted(lengths)}"
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def objects(self) -> int:
        return int(sum(len(labels) for labels in self.labels))

    def subset(self, indices: np.ndarray | list[int]) -> DetectionDataset:
        """The images at ``indices``, in that order (the fingerprint names the selection too)."""
        idx = np.asarray(indices, dtype=np.int64)
        picked = hashlib.sha256(idx.tobytes()).hexdigest()[:16]
        return DetectionDataset(
            images=self.images[idx],
            boxes=[self.boxes[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            classes=list(self.classes),
            names=[self.names[i] for i in idx],
            letterbox=self.letterbox[idx],
            fingerprint=hashlib.sha256(f"{self.fingerprint}:{picked}".encode()).hexdigest(),
            source=self.source,
            normalisation=dict(self.normalisation),
        )

    def boxes_xyxy_pixels(self, index: int) -> np.ndarray:
        """Image ``index``'s boxes as (x0, y0, x1, y1) in pixels of its *original* image."""
        scale_x, scale_y, pad_x, pad_y = (float(v) for v in self.letterbox[index, :4])
        cx, cy, w, h = (self.boxes[index].astype(np.float64) * self.image_size).T
        xyxy = np.stack(
            [
                (cx - w / 2 - pad_x) / scale_x,
                (cy - h / 2 - pad_y) / scale_y,
                (cx + w / 2 - pad_x) / scale_x,
                (cy + h / 2 - pad_y) / scale_y,
            ],
            axis=1,
        )
        return xyxy.astype(np.float32)


def split_dataset(
    data: DetectionDataset, val_fraction: float, seed: int
) -> tuple[DetectionDataset, DetectionDataset]:
    """(train, val): ``round(N * val_fraction)`` images held out at random (seeded), both in random order."""
    n_val = round(len(data) * val_fraction)
    if not 0 < n_val < len(data):
        raise DataError(
            f"{data.source}: {len(data)} images are too few to hold out val_fraction={val_fraction}; "
            "add images or change data.val_fraction"
        )
    order = seeded_rng(seed, "detection-split").permutation(len(data))
    return data.subset(order[n_val:]), data.subset(order[:n_val])


def detection_normalisation(size: int) -> dict:
    """The preprocessing record (what a device must reproduce): the image record plus letterbox."""
    record = image_normalisation(
        size, "image file decoded with Pillow, converted to RGB, 8-bit values divided by 255", LETTERBOX
    )
    record["letterbox"] = {"placement": "centre", "pad": "ImageNet mean colour", "boxes": "cxcywh in [0, 1]"}
    return record


def image_size_of(file: Path, hint: str) -> tuple[int, int]:
    """The (width, height) of image ``file`` from its header; ``hint`` says where it was referenced."""
    from PIL import Image

    if not file.is_file():
        raise DataError(f"{file}: image not found ({hint}); add the image or remove its entry")
    try:
        with Image.open(file) as image:
            return int(image.size[0]), int(image.size[1])
    except OSError as exc:
        if exc.strerror:  # the file itself could not be opened or read
            raise DataError(f"{file}: cannot be read ({exc.strerror}; {hint}); fix or remove it") from None
        raise DataError(
            f"{file}: cannot be read as an image ({_reason(exc)}); fix or remove the file"
        ) from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"{file}: cannot be read as an image ({_reason(exc)}); fix or remove the file"
        ) from None


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def letterbox_image(raw: bytes, file: Path, size: int) -> tuple[np.ndarray, tuple[float, ...]]:
    """Image bytes as float32 (3, size, size) in [0, 1], letterboxed, and its letterbox record
    (scale_x, scale_y, pad_x, pad_y, width, height): the resize per axis (exact after rounding the
    resized side), the padding in pixels and the original size."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"{file}: cannot be read as an image ({_reason(exc)}); fix or remove the file"
        ) from None
    width, height = rgb.size
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    if (new_w, new_h) != (width, height):
        rgb = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    canvas = np.empty((3, size, size), dtype=np.float32)
    canvas[:] = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
    pixels = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    canvas[:, pad_y : pad_y + new_h, pad_x : pad_x + new_w] = pixels / np.float32(255.0)
    return canvas, (new_w / width, new_h / height, float(pad_x), float(pad_y), float(width), float(height))


def check_box_xyxy(box: np.ndarray, width: int, height: int, where: str, todo: str) -> np.ndarray:
    """A pixel box (x0, y0, x1, y1) checked against the image, clipped to it; DataError if outside.

    ``where`` names the file and entry (e.g. ``annotations.json annotations[3] (id 7)``) and ``todo``
    what to do. A box may reach :data:`BOX_TOLERANCE` of the image side beyond the border.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if not np.all(np.isfinite(box)):
        raise DataError(f"{where}: box {_fmt(box)} is not finite; {todo}")
    if x1 - x0 < MIN_BOX_PIXELS or y1 - y0 < MIN_BOX_PIXELS:
        raise DataError(f"{where}: box {_fmt(box)} has no width or height; {todo}")
    tol_x, tol_y = BOX_TOLERANCE * width, BOX_TOLERANCE * height
    if x0 < -tol_x or y0 < -tol_y or x1 > width + tol_x or y1 > height + tol_y:
        raise DataError(
            f"{where}: box (x0, y0, x1, y1) = {_fmt(box)} lies outside the {width}x{height} image "
            f"(more than {BOX_TOLERANCE:.0%} of its side beyond the border); {todo}"
        )
    return np.array([max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)], dtype=np.float64)


def _fmt(box: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in box) + ")"


def to_letterboxed_cxcywh(xyxy: np.ndarray, letterbox: tuple[float, ...], size: int) -> np.ndarray:
    """Pixel boxes (K, 4) x0, y0, x1, y1 of the original image -> cxcywh in [0, 1] of the S x S input."""
    scale_x, scale_y, pad_x, pad_y = letterbox[:4]
    boxes = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]] * scale_x + pad_x
    boxes[:, [1, 3]] = boxes[:, [1, 3]] * scale_y + pad_y
    cxcywh = np.stack(
        [
            (boxes[:, 0] + boxes[:, 2]) / 2,
            (boxes[:, 1] + boxes[:, 3]) / 2,
            boxes[:, 2] - boxes[:, 0],
            boxes[:, 3] - boxes[:, 1],
        ],
        axis=1,
    )
    return np.clip(cxcywh / size, 0.0, 1.0).astype(np.float32)


def require_classes(classes: list[str], where: str, todo: str) -> None:
    """DataError unless ``classes`` names at least :data:`~edgekd.data.base.MIN_CLASSES` categories."""
    if len(classes) < MIN_CLASSES:
        listed = ", ".join(classes) or "none"
        raise DataError(
            f"{where}: {len(classes)} class{'es' if len(classes) != 1 else ''} ({listed}), a detector here "
            f"needs at least {MIN_CLASSES}; {todo}"
        )


def assemble(
    entries: list[tuple[str, Path, np.ndarray, np.ndarray]],
    classes: list[str],
    size: int,
    settings: dict,
    source: str,
) -> DetectionDataset:
    """The dataset of ``entries`` (name, image file, pixel xyxy boxes, labels) at side ``size``.

    The fingerprint hashes ``settings`` (the annotation files' digests, the loader and side) with
    every image's bytes.
    """
    check_memory(
        len(entries) * 3 * size * size * 4,
        source,
        f"{len(entries)} images at side {size}",
        "lower the image size or use fewer images",
    )
    images = np.empty((len(entries), 3, size, size), dtype=np.float32)
    boxes, labels, names, letterbox = [], [], [], np.zeros((len(entries), 6), dtype=np.float32)
    digest = hashlib.sha256(repr(sorted(settings.items())).encode())
    for i, (name, file, xyxy, cls) in enumerate(entries):
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise DataError(f"{file}: cannot be read ({exc.strerror or exc}); fix or remove it") from None
        pixels, record = letterbox_image(raw, file, size)
        images[i] = normalise_images(pixels)  # per image: no full-size temporaries
        letterbox[i] = record
        boxes.append(to_letterboxed_cxcywh(xyxy, record, size))
        labels.append(np.asarray(cls, dtype=np.int64).reshape(-1))
        names.append(name)
        digest.update(f"{name}:{hashlib.sha256(raw).hexdigest()};".encode())
    return DetectionDataset(
        images=images,
        boxes=boxes,
        labels=labels,
        classes=list(classes),
        names=names,
        letterbox=letterbox,
        fingerprint=digest.hexdigest(),
        source=source,
        normalisation=detection_normalisation(size),
    )
