"""Ultralytics-style YOLO detection folders: ``images/``, ``labels/`` and a class list.

The layout Ultralytics documents for detection datasets (https://docs.ultralytics.com/datasets/detect/):

- ``ROOT/images/...`` image files, flat or in split folders (``images/train``, ``images/val``);
- ``ROOT/labels/...`` one ``.txt`` per image at the mirrored path (``images/val/a.jpg`` ->
  ``labels/val/a.txt``), one object per line: ``class cx cy w h`` with the box centre and size
  normalised to [0, 1] by the image's width and height; an image without a label file (or with an
  empty one) has no objects, as in Ultralytics;
- the class names in ``ROOT/data.yaml`` (``names:`` a list, or a mapping ``0: name``; its ``path``,
  ``train`` and ``val`` entries are not read: the folders above are) or else in ``ROOT/classes.txt``
  (one name per line, line ``i`` is class ``i``).

Polygon (segmentation) label lines are not read: export the dataset with boxes. :func:`load_yolo`
returns a :class:`~edgekd.detection.data.DetectionDataset`; every bad input is one-line
:class:`~edgekd.errors.DataError`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from edgekd.data.vision import IMAGE_EXTENSIONS
from edgekd.detection.data import DetectionDataset, assemble, check_box_xyxy, image_size_of, require_classes
from edgekd.errors import DataError

YOLO_VERSION = 1  # bump when this loader's output changes (invalidates cached fingerprints)
LABEL_FIELDS = 5  # class cx cy w h


def _layout(root: Path) -> str:
    return f"expected {root}/images/, {root}/labels/ and {root}/data.yaml (names:) or {root}/classes.txt"


def yolo_classes(root: Path) -> tuple[list[str], bytes, Path]:
    """The class names of the folder, the bytes of the file they come from, and that file."""
    import yaml

    data_yaml = next((root / name for name in ("data.yaml", "data.yml") if (root / name).is_file()), None)
    if data_yaml is not None:
        raw = data_yaml.read_bytes()
        try:
            document = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise DataError(f"{data_yaml}: not valid YAML{where}; fix the file") from None
        names = document.get("names") if isinstance(document, dict) else None
        if isinstance(names, dict):
            keys = sorted(names, key=lambda k: (not isinstance(k, int), k if isinstance(k, int) else 0))
            if keys != list(range(len(names))):
                raise DataError(
                    f'{data_yaml}: "names" keys are {list(names)}, expected 0..{len(names) - 1}; '
                    "number the classes from 0 without gaps"
                )
            names = [names[k] for k in keys]
        if not isinstance(names, list) or not all(isinstance(n, str | int) for n in names):
            raise DataError(
                f'{data_yaml}: field "names" is {names!r}, expected a list of class names '
                "(or a mapping 0: name, 1: name, ...); fix the file"
            )
        classes = [str(n).strip() for n in names]
        source = data_yaml
    elif (root / "classes.txt").is_file():
        source = root / "classes.txt"
        raw = source.read_bytes()
        classes = [
            line.strip() for line in raw.decode("utf-8", errors="replace").splitlines() if line.strip()
        ]
    else:
        raise DataError(f"{root}: no data.yaml or classes.txt naming the classes; {_layout(root)}")
    require_classes(classes, str(source), "list one name per class (class i is line/entry i)")
    return classes, raw, source


def _parse_labels(
    file: Path, classes: list[str], width: int, height: int
) -> tuple[np.ndarray, np.ndarray, bytes]:
    """Pixel boxes (K, 4) xyxy and labels (K,) of one label file, and its bytes."""
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise DataError(f"{file}: cannot be read ({exc.strerror or exc}); fix or remove it") from None
    boxes, labels = [], []
    todo = "fix the line (class cx cy w h, each of cx cy w h in [0, 1] of the image)"
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{file} line {number} ({line.strip()!r})"
        if len(fields) != LABEL_FIELDS:
            kind = "a polygon (segment) label" if len(fields) > LABEL_FIELDS and len(fields) % 2 == 1 else ""
            raise DataError(
                f"{where}: {len(fields)} values{f', {kind}' if kind else ''}, expected "
                f"{LABEL_FIELDS}: class cx cy w h; fix the line (boxes only)"
            )
        try:
            values = [float(v) for v in fields[1:]]
            cls = int(fields[0]) if float(fields[0]).is_integer() else None
        except ValueError:
            raise DataError(f"{where}: not numbers; {todo}") from None
        if cls is None:
            raise DataError(f"{where}: class {fields[0]!r} is not an integer; {todo}")
        if not 0 <= cls < len(classes):
            raise DataError(
                f"{where}: unknown class {cls} ({len(classes)} classes, 0..{len(classes) - 1}); "
                "fix the class or add it to the class list"
            )
        cx, cy, w, h = values
        xyxy = np.array(
            [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        )
        boxes.append(check_box_xyxy(xyxy, width, height, where, todo))
        labels.append(cls)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64), raw


def load_yolo(root: str | Path, size: int, split: str | None = None) -> DetectionDataset:
    """The images and boxes of a YOLO folder ``root``, letterboxed to ``size`` x ``size``.

    ``split`` (e.g. ``"val"``) reads ``images/<split>`` only; without it every image under
    ``images/`` is read.
    """
    base = Path(root)
    if not base.is_dir():
        state = "is a file, not a directory" if base.exists() else "not found"
        raise DataError(f"{base}: {state}; set data.path to a YOLO folder ({_layout(base)})")
    images_root, labels_root = base / "images", base / "labels"
    for folder in (images_root, labels_root):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found; {_layout(base)}")
    classes, class_bytes, class_file = yolo_classes(base)
    if split is not None:
        images_root, labels_root = images_root / split, labels_root / split
        if not images_root.is_dir():
            raise DataError(f"{images_root}: split folder not found; {_layout(base)} with images/{split}/")
    image_files = sorted(
        p for p in images_root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    stems = {f.relative_to(images_root).with_suffix("").as_posix() for f in image_files}
    for label_file in sorted(labels_root.rglob("*.txt")) if labels_root.is_dir() else []:
        if label_file.relative_to(labels_root).with_suffix("").as_posix() not in stems:
            stem = label_file.relative_to(labels_root).with_suffix("")
            raise DataError(
                f"{label_file}: its image is missing (no {images_root}/{stem}.<image extension>); "
                "add the image or remove the label file"
            )
    if not image_files:
        raise DataError(f"{images_root}: no images ({', '.join(IMAGE_EXTENSIONS)}); {_layout(base)}")
    entries, label_digests, objects = [], [], 0
    for file in image_files:
        relative = file.relative_to(images_root)
        width, height = image_size_of(file, f"listed under {images_root}")
        label_file = (labels_root / relative).with_suffix(".txt")
        if label_file.is_file():
            xyxy, labels, label_raw = _parse_labels(label_file, classes, width, height)
            label_digests.append([relative.as_posix(), hashlib.sha256(label_raw).hexdigest()])
        else:
            xyxy, labels = np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
        objects += len(labels)
        entries.append((relative.as_posix(), file, xyxy, labels))
    if not objects:
        raise DataError(
            f"{labels_root}: no boxes in any label file ({len(image_files)} images); add label files "
            "(class cx cy w h per line) for the images"
        )
    settings = {
        "loader": "yolo",
        "version": YOLO_VERSION,
        "classes_sha256": hashlib.sha256(class_bytes).hexdigest(),
        "classes_file": class_file.name,
        "labels": repr(label_digests),
        "split": split,
        "image_size": size,
    }
    return assemble(entries, classes, size, settings, str(base))
