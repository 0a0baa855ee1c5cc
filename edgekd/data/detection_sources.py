"""Detection datasets in the dataset registry: ``scenes`` (built in), ``coco`` and ``yolo`` (the user's).

Each builder returns its own ``(train, val)`` pair of :class:`~edgekd.detection.data.DetectionDataset`
and a :class:`~edgekd.data.base.DatasetMeta` with ``task == "detection"``, ``input_shape`` (3, S, S)
(S = ``data.image_size``; 128 by default for detection, :data:`edgekd.tasks.DETECTION_DEFAULTS`), the
classes, the letterbox + ImageNet normalisation record, and a fingerprint hashing both splits' images
and annotations with the loading settings.

- ``scenes``: the built-in synthetic scenes (:mod:`edgekd.detection.synthetic`: shapes and handwritten
  digits on cluttered backgrounds, 13 classes, no download), deterministic from the recipe's seed.
  ``data.scenes`` scenes (default :data:`DEFAULT_SCENES`) are split into train and held-out by
  ``data.val_fraction`` (the two splits come from independent random streams and disjoint digit
  glyphs). They are written once as JPEG + COCO json under ``<data dir>/scenes-s<seed>-n<train>+<val>
  -<side>px-v<version>/`` (the data dir is ``<runs_dir>/../data``, i.e. ``models/data`` by default, or
  ``$EDGEKD_DATA_DIR``) and read back through the COCO loader, the path user data takes.
- ``coco``: ``data.path`` is an annotations json (images beside it, in ``images/`` beside it, or in
  ``data.images``), split into train and held-out by ``data.val_fraction`` (seeded); or a folder
  holding ``train/annotations.json`` and ``val/annotations.json`` (that split is kept; the layout
  ``scenes`` writes).
- ``yolo``: ``data.path`` is an Ultralytics folder (``images/``, ``labels/``, ``data.yaml`` or
  ``classes.txt``); with ``images/train`` and ``images/val`` that split is kept, else every image is
  read and split by ``data.val_fraction``.

Default size, measured (``edgekd compress --data scenes --target x86-openvino`` alone on two CPU cores,
1,500 train / 500 held-out scenes): a step of batch 16 at 128 px took about 0.31 s for the teacher
(``edgekd:detr-mnv3l``, set loss) and 0.17 s for the student under ``clockdistill`` (epochs of 94
steps: 35 s and 18 s with the held-out evaluation); see :data:`edgekd.tasks.DETECTION_TRAIN` for the
epochs that keep the run within its 15 minutes at the default 4,000 scenes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from edgekd.data.base import DATASETS, DatasetMeta
from edgekd.errors import DataError, RecipeError
from edgekd.recipe import DataSpec
from edgekd.tasks import DETECTION

DEFAULT_SCENES = 4000
DATA_DIR_ENV = "EDGEKD_DATA_DIR"
DEFAULT_DATA_DIR = Path("models/data")  # <runs_dir>/../data for the default runs_dir (models/runs)


def data_dir(default: Path | None = None) -> Path:
    """Where built-in detection data is written: ``$EDGEKD_DATA_DIR``, else ``default`` (the run's
    ``<runs_dir>/../data``), else ``models/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else (default or DEFAULT_DATA_DIR)


def scene_counts(spec: DataSpec) -> tuple[int, int]:
    """(train, val) scene counts: ``data.scenes`` (default :data:`DEFAULT_SCENES`) split by val_fraction."""
    total = spec.scenes if spec.scenes is not None else DEFAULT_SCENES
    val = round(total * spec.val_fraction)
    if not 0 < val < total:
        raise RecipeError(
            f"data.scenes={total} with data.val_fraction={spec.val_fraction} leaves "
            f"{'no held-out' if val <= 0 else 'no train'} scenes; raise data.scenes or change "
            "data.val_fraction"
        )
    return total - val, val


def _meta(name: str, train, val, spec: DataSpec, source: str) -> DatasetMeta:  # noqa: ANN001
    fingerprint = hashlib.sha256(f"{name}:{train.fingerprint}:{val.fingerprint}".encode()).hexdigest()
    return DatasetMeta(
        name=name,
        task=DETECTION,
        input_shape=(3, spec.image_size, spec.image_size),
        classes=list(train.classes),
        normalisation=dict(train.normalisation),
        fingerprint=fingerprint,
        source=source,
        labelled=True,
    )


def _require_path(spec: DataSpec, what: str) -> Path:
    if spec.path is None:
        raise RecipeError(f"data.name={spec.name!r} needs data.path ({what}); pass --data-path")
    return Path(spec.path)


@DATASETS.register("scenes", aliases=("synthetic-scenes",))
def scenes_source(spec: DataSpec, seed: int, root_dir: Path | None = None):  # noqa: ANN201
    """The built-in detection scenes (see the module docstring), written under :func:`data_dir`."""
    from edgekd.detection.synthetic import SCENE_SIZE, SYNTHETIC_VERSION, load_synthetic

    train_count, val_count = scene_counts(spec)
    folder = f"scenes-s{seed}-n{train_count}+{val_count}-{SCENE_SIZE}px-v{SYNTHETIC_VERSION}"
    root = data_dir(root_dir) / folder
    train, val = load_synthetic(root, seed, spec.image_size, train_count, val_count, SCENE_SIZE)
    source = (
        f"built-in detection scenes (seed {seed}, {train_count} train + {val_count} held-out, "
        f"{len(train.classes)} classes) in {root}"
    )
    return (train, val), _meta("scenes", train, val, spec, source)


def _split(data, spec: DataSpec, seed: int):  # noqa: ANN001, ANN202
    from edgekd.detection.data import split_dataset

    return split_dataset(data, spec.val_fraction, seed)


@DATASETS.register("coco", aliases=("coco-json",))
def coco_source(spec: DataSpec, seed: int, root_dir: Path | None = None):  # noqa: ANN201, ARG001
    """A COCO annotations json, or a folder of ``train/`` and ``val/`` ones (see the module docstring)."""
    from edgekd.detection.coco import load_coco

    path = _require_path(
        spec, "the COCO annotations .json, or a folder with train/ and val/ annotations.json"
    )
    images = Path(spec.images) if spec.images is not None else None
    if path.is_dir():
        files = {split: path / split / "annotations.json" for split in ("train", "val")}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise DataError(
                f"{path}: a folder needs train/annotations.json and val/annotations.json ({missing[0]} not "
                "found); or set data.path to one annotations .json"
            )
        if images is not None:
            raise RecipeError(
                f"data.images={str(images)!r} applies to one annotations .json; with the folder {path} the "
                "images are looked up beside each split's json: leave data.images unset"
            )
        train, val = (load_coco(files[split], spec.image_size) for split in ("train", "val"))
        if train.classes != val.classes:
            raise DataError(
                f"{files['val']}: its categories differ from {files['train']}'s; use the same categories list"
            )
    elif path.is_file():
        train, val = _split(load_coco(path, spec.image_size, images), spec, seed)
    else:
        raise DataError(f"{path}: not found; set data.path to a COCO annotations .json")
    return (train, val), _meta("coco", train, val, spec, f"COCO annotations {path}")


@DATASETS.register("yolo", aliases=("ultralytics",))
def yolo_source(spec: DataSpec, seed: int, root_dir: Path | None = None):  # noqa: ANN201, ARG001
    """An Ultralytics YOLO folder (see the module docstring)."""
    from edgekd.detection.yolo import load_yolo

    root = _require_path(spec, "the YOLO folder with images/ and labels/")
    if (root / "images" / "train").is_dir() and (root / "images" / "val").is_dir():
        train, val = (load_yolo(root, spec.image_size, split) for split in ("train", "val"))
    else:
        train, val = _split(load_yolo(root, spec.image_size), spec, seed)
    return (train, val), _meta("yolo", train, val, spec, f"YOLO folder {root}")
