"""COCO-format detection annotations: one ``annotations.json`` and its images.

The file follows the COCO object detection format (Lin et al., "Microsoft COCO: Common Objects in
Context", ECCV 2014; https://cocodataset.org/#format-data):

- ``images``: ``{"id", "file_name"[, "width", "height"]}``; the file is looked up in the images
  directory when one is given, else beside the json, else in an ``images/`` folder beside it.
- ``annotations``: ``{"id", "image_id", "category_id", "bbox": [x, y, w, h]}`` in pixels, top-left
  origin; ``"iscrowd": 1`` regions are skipped, as DETR's loader does (they are "ignore" regions).
- ``categories``: ``{"id", "name"}``; ids may be any integers (COCO's run 1..90 with gaps): class
  index ``i`` is the ``i``-th category in ascending id order.

Images without annotations stay in the set as negatives. :func:`load_coco` returns a
:class:`~edgekd.detection.data.DetectionDataset`; every bad input is one-line
:class:`~edgekd.errors.DataError`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from edgekd.detection.data import DetectionDataset, assemble, check_box_xyxy, image_size_of, require_classes
from edgekd.errors import DataError

COCO_VERSION = 1  # bump when this loader's output changes (invalidates cached fingerprints)


def _read_json(path: Path) -> tuple[dict, bytes]:
    if not path.is_file():
        state = "is a directory, not a file" if path.is_dir() else "not found"
        raise DataError(f"{path}: {state}; set data.path to a COCO annotations.json file")
    raw = path.read_bytes()
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = (
            f"line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "encoding"
        )
        raise DataError(f"{path}: not valid JSON ({where}: {_reason(exc)}); fix the file") from None
    if not isinstance(document, dict):
        raise DataError(
            f"{path}: top level is a {type(document).__name__}, expected a COCO object with "
            '"images", "annotations" and "categories"; fix the file'
        )
    return document, raw


def _reason(exc: Exception) -> str:
    return getattr(exc, "msg", None) or str(exc).splitlines()[0]


def _records(document: dict, key: str, path: Path) -> list[dict]:
    value = document.get(key)
    if not isinstance(value, list):
        found = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f'{path}: field "{key}" is {found}, expected a list; fix the file (COCO format)')
    for index, record in enumerate(value):
        if not isinstance(record, dict):
            raise DataError(
                f"{path}: {key}[{index}] is a {type(record).__name__}, expected an object; fix it"
            )
    return value


def _int_field(record: dict, name: str, where: str) -> int:
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f'{where}: field "{name}" is {value!r}, expected an integer; fix the entry')
    return value


def _categories(document: dict, path: Path) -> tuple[list[int], list[str]]:
    ids: dict[int, str] = {}
    for index, record in enumerate(_records(document, "categories", path)):
        where = f"{path}: categories[{index}]"
        cid = _int_field(record, "id", where)
        name = record.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f'{where}: field "name" is {name!r}, expected a non-empty string; fix the entry')
        if cid in ids:
            raise DataError(f"{where}: category id {cid} is listed twice ({ids[cid]!r}, {name!r}); keep one")
        ids[cid] = name.strip()
    order = sorted(ids)
    classes = [ids[cid] for cid in order]
    require_classes(classes, f'{path}: "categories"', "list every category the annotations use")
    return order, classes


def _image_file(name: str, path: Path, images_dir: Path | None) -> Path:
    if images_dir is not None:
        return images_dir / name
    beside = path.parent / name
    if beside.exists():
        return beside
    nested = path.parent / "images" / name
    return nested if nested.exists() else beside


def load_coco(annotations: str | Path, size: int, images_dir: str | Path | None = None) -> DetectionDataset:
    """The images and boxes of a COCO ``annotations`` json, letterboxed to ``size`` x ``size``.

    ``images_dir`` holds the images (``file_name`` relative to it); without it they are looked up
    beside the json, then in ``images/`` beside it.
    """
    path = Path(annotations)
    document, raw_json = _read_json(path)
    images_root = Path(images_dir) if images_dir is not None else None
    if images_root is not None and not images_root.is_dir():
        raise DataError(f"{images_root}: images directory not found; set data.images to the folder of images")
    category_ids, classes = _categories(document, path)
    label_of = {cid: i for i, cid in enumerate(category_ids)}
    images: dict[int, dict] = {}
    for index, record in enumerate(_records(document, "images", path)):
        where = f"{path}: images[{index}]"
        iid = _int_field(record, "id", where)
        name = record.get("file_name")
        if not isinstance(name, str) or not name:
            raise DataError(f'{where}: field "file_name" is {name!r}, expected the image file name; fix it')
        if iid in images:
            raise DataError(f"{where}: image id {iid} is listed twice; give each image its own id")
        images[iid] = record
    if not images:
        raise DataError(f'{path}: "images" is empty; list the images the annotations refer to')
    boxes: dict[int, list[np.ndarray]] = {iid: [] for iid in images}
    labels: dict[int, list[int]] = {iid: [] for iid in images}
    records = _records(document, "annotations", path)
    kept = 0
    pending = []
    for index, record in enumerate(records):
        where = f"{path}: annotations[{index}]" + (f" (id {record['id']})" if "id" in record else "")
        if record.get("iscrowd", 0):
            continue
        iid = _int_field(record, "image_id", where)
        if iid not in images:
            raise DataError(
                f'{where}: image_id {iid} is not in "images"; add the image or drop the annotation'
            )
        cid = _int_field(record, "category_id", where)
        if cid not in label_of:
            known = ", ".join(str(c) for c in category_ids)
            raise DataError(
                f"{where}: unknown category_id {cid} (categories: {known}); "
                'add it to "categories" or fix the id'
            )
        bbox = record.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
        ):
            raise DataError(
                f'{where}: field "bbox" is {bbox!r}, expected [x, y, width, height] in pixels; fix it'
            )
        pending.append((where, iid, np.asarray(bbox, dtype=np.float64), label_of[cid]))
        kept += 1
    if not kept:
        crowd = len(records)
        detail = f"all {crowd} are iscrowd regions" if crowd else "the list is empty"
        raise DataError(f'{path}: "annotations" holds no boxes ({detail}); annotate the images with boxes')
    files: dict[int, tuple[Path, int, int]] = {}
    for iid, record in images.items():
        file = _image_file(record["file_name"], path, images_root)
        width, height = image_size_of(
            file, f'{path}: images entry id {iid}, "file_name" {record["file_name"]!r}'
        )
        for key, actual in (("width", width), ("height", height)):
            stated = record.get(key)
            if stated is not None and stated != actual:
                raise DataError(
                    f'{path}: image id {iid} states "{key}" {stated!r} but {file} is {width}x{height}; '
                    "fix the json's size or the image"
                )
        files[iid] = (file, width, height)
    todo = "fix the box (COCO bbox is [x, y, width, height] in pixels) or the image"
    for where, iid, (x, y, w, h), label in pending:
        _, width, height = files[iid]
        boxes[iid].append(check_box_xyxy(np.array([x, y, x + w, y + h]), width, height, where, todo))
        labels[iid].append(label)
    entries = []
    for iid in sorted(images):
        file = files[iid][0]
        xyxy = np.asarray(boxes[iid], dtype=np.float64).reshape(-1, 4)
        entries.append((images[iid]["file_name"], file, xyxy, np.asarray(labels[iid], dtype=np.int64)))
    settings = {
        "loader": "coco",
        "version": COCO_VERSION,
        "annotations_sha256": hashlib.sha256(raw_json).hexdigest(),
        "image_size": size,
    }
    return assemble(entries, classes, size, settings, str(path))
