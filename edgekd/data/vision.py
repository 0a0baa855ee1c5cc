"""Image classification datasets: scikit-learn's handwritten digits and ImageFolder directories.

- ``digits``: the 1,797 8x8 grayscale digits bundled with scikit-learn (``load_digits``, the UCI
  "Optical Recognition of Handwritten Digits" test set; no download), 10 classes "0".."9".
- ``imagefolder``: a directory laid out as torchvision's ImageFolder, either ``DIR/<class>/*.png``
  (split here, stratified by class) or ``DIR/train/<class>/...`` and ``DIR/val/<class>/...`` (that
  split is kept).

Every source gives float32 images (N, 3, S, S) with S = ``data.image_size``: pixel values scaled to
[0, 1], resized, then normalised per RGB channel with ImageNet's mean and std (timm's
``IMAGENET_DEFAULT_MEAN`` / ``IMAGENET_DEFAULT_STD``, the statistics timm's pretrained models expect).
The exact preprocessing is recorded in :attr:`DatasetMeta.normalisation`.

An ImageFolder can be streamed (``data.stream``, see :mod:`edgekd.data.streaming`): its splits then
hold file paths, and images are decoded per batch with the very same preprocessing (identical
float32 values). ``auto`` streams when the train split's decoded images would take more than
:data:`STREAM_MEMORY_SHARE` of the memory available when the dataset is built.
"""

from __future__ import annotations

import hashlib
import io
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgekd.data.base import (
    DATASETS,
    ArrayDataset,
    DatasetMeta,
    available_memory,
    check_memory,
    seeded_rng,
    strata,
    stratified_pick,
)
from edgekd.data.streaming import FileArray
from edgekd.errors import DataError
from edgekd.hashing import sha256_json
from edgekd.recipe import DataSpec

# The same numbers as timm.data.IMAGENET_DEFAULT_MEAN / IMAGENET_DEFAULT_STD (kept here so loading
# data does not import timm; a test checks they agree).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_NORMALISATION = "image-mean-std"
# torchvision's ImageFolder extensions (matched case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DIGITS_VERSION = 1  # bump when the digits preprocessing changes (invalidates cached fingerprints)
DIGITS_COUNT = 1797  # images in scikit-learn's digits
# Memory estimate (see edgekd.data.base.check_memory): float32 (3, S, S) images exist about this many
# times at once while a dataset is built (decoded/resized, stacked, normalised, train/val subsets).
IMAGE_COPIES = 4
# data.stream: auto streams an ImageFolder whose decoded train images exceed this share of available memory
STREAM_MEMORY_SHARE = 0.25


def image_memory(images: int, size: int) -> int:
    """Rough peak bytes of building ``images`` float32 RGB images of ``size`` x ``size``."""
    return IMAGE_COPIES * images * 3 * size * size * 4


def _per_channel(values: tuple[float, ...]) -> np.ndarray:
    """Channel statistics shaped (C, 1, 1) to broadcast over (..., C, H, W)."""
    return np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)


def normalise_images(
    x: np.ndarray, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> np.ndarray:
    """``(x - mean) / std`` per channel for images (..., C, H, W) with values in [0, 1]; float32."""
    mean_, std_ = _per_channel(mean), _per_channel(std)
    return (np.asarray(x, dtype=np.float32) - mean_) / std_


def denormalise_images(
    x: np.ndarray, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> np.ndarray:
    """The inverse of :func:`normalise_images`: images back to [0, 1] values."""
    mean_, std_ = _per_channel(mean), _per_channel(std)
    return np.asarray(x, dtype=np.float32) * std_ + mean_


def image_normalisation(size: int, reading: str, resize: str) -> dict:
    """The :attr:`DatasetMeta.normalisation` record of an image source (what a device must reproduce)."""
    return {
        "type": IMAGE_NORMALISATION,
        "description": (
            f"{reading}; resized to {size}x{size} ({resize}); then (x - mean) / std per RGB channel "
            f"with mean {list(IMAGENET_MEAN)}, std {list(IMAGENET_STD)} (ImageNet, timm's default); "
            "float32, layout (3, H, W)"
        ),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "size": [size, size],
        "resize": resize,
        "layout": "CHW, RGB",
    }


def _meta(
    name: str,
    data: ArrayDataset,
    classes: list[str],
    normalisation: dict,
    settings: dict,
    source: str,
    mirror_invariant: bool,
) -> DatasetMeta:
    return DatasetMeta(
        name=name,
        task="classification",
        input_shape=tuple(data.x.shape[1:]),
        classes=classes,
        normalisation=normalisation,
        fingerprint=sha256_json(settings),
        source=source,
        mirror_invariant=mirror_invariant,
    )


# --------------------------------------------------------------------------- digits


@DATASETS.register("digits", aliases=("sklearn-digits",))
def load_digits_dataset(spec: DataSpec, seed: int) -> tuple[ArrayDataset, DatasetMeta]:
    """scikit-learn's 8x8 digits, upsampled bilinearly to ``spec.image_size`` and replicated to RGB."""
    from sklearn.datasets import load_digits

    check_memory(
        image_memory(DIGITS_COUNT, spec.image_size),
        "digits",
        f"data.image_size={spec.image_size} ({DIGITS_COUNT} images)",
        "lower data.image_size",
    )
    bunch = load_digits()
    pixels = np.asarray(bunch.images, dtype=np.float32) / 16.0  # 0..16 intensities -> [0, 1]
    resized = F.interpolate(
        torch.from_numpy(pixels[:, None]), size=(spec.image_size,) * 2, mode="bilinear", align_corners=False
    ).numpy()
    x = normalise_images(np.repeat(resized, 3, axis=1))
    y = np.asarray(bunch.target, dtype=np.int64)
    settings = {
        "loader": "digits",
        "version": DIGITS_VERSION,
        "images_sha256": hashlib.sha256(np.ascontiguousarray(bunch.images).tobytes()).hexdigest(),
        "seed": seed,
        **spec.model_dump(include={"image_size", "val_fraction"}),
    }
    normalisation = image_normalisation(
        spec.image_size,
        "8x8 grayscale intensities 0..16 divided by 16, replicated to 3 channels",
        "torch.nn.functional.interpolate, bilinear, align_corners=False",
    )
    data = ArrayDataset(x, y, None)
    meta = _meta(
        "digits",
        data,
        [str(label) for label in bunch.target_names],
        normalisation,
        settings,
        "scikit-learn load_digits (UCI handwritten digits, 1,797 8x8 images)",
        mirror_invariant=False,  # a mirrored digit is another glyph
    )
    return data, meta


# --------------------------------------------------------------------------- ImageFolder


def _layout_hint(root: Path) -> str:
    return f"expected {root}/<class>/<image> or {root}/train/<class>/<image> and {root}/val/<class>/<image>"


def _class_files(root: Path) -> dict[str, list[Path]]:
    """For each non-hidden subfolder of ``root`` (a class), its image files, recursive and sorted."""
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes[folder.name] = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
    return classes


def _read_image(file: Path, size: int) -> tuple[np.ndarray, str]:
    """One image as float32 (3, size, size) in [0, 1], and the sha256 of the file's bytes."""
    raw = _read_bytes(file)
    return _decode(raw, file, size), hashlib.sha256(raw).hexdigest()


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:
        raise DataError(f"{file}: cannot be read ({exc.strerror or exc}); fix or remove the file") from None


def read_normalised(path: str, size: int) -> np.ndarray:
    """One image file decoded and normalised exactly as the in-memory path: float32 (3, size, size).

    The reader of a streamed ImageFolder (:class:`~edgekd.data.streaming.FileArray`).
    """
    file = Path(path)
    return normalise_images(_decode(_read_bytes(file), file, size))


def _decode(raw: bytes, file: Path, size: int) -> np.ndarray:
    """The bytes of image ``file`` as float32 (3, size, size) in [0, 1] (RGB, bilinear resize)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as image:
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{file}: cannot be read as an image ({reason}); fix or remove the file") from None
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0


def _load_split(
    root: Path,
    files: dict[str, list[Path]],
    classes: list[str],
    spec: DataSpec,
    seed: int,
    stream: str,
    streamed: bool = False,
) -> tuple[ArrayDataset, list[list[str]]]:
    """Images of one split (capped at ``spec.max_frames``, stratified) and (relative path, sha256) pairs.

    ``streamed``: the images stay on disk (a :class:`FileArray`, decoded per batch); their bytes are
    still hashed here, so the dataset's fingerprint is the same either way.
    """
    empty = [name for name in classes if not files[name]]
    if empty:
        raise DataError(
            f"{root}: class folder(s) {', '.join(empty)} hold no images ({', '.join(IMAGE_EXTENSIONS)}); "
            "add images or remove those folders"
        )
    paths = [file for name in classes for file in files[name]]
    labels = np.concatenate([np.full(len(files[name]), i, dtype=np.int64) for i, name in enumerate(classes)])
    keep = np.arange(len(paths))
    if spec.max_frames is not None and spec.max_frames < len(paths):
        keep = stratified_pick(
            strata(labels, None), spec.max_frames, seeded_rng(seed, f"max-frames-{stream}")
        )
    if streamed:
        relative = [paths[index].relative_to(root).as_posix() for index in keep]
        provenance = [[name, hashlib.sha256(_read_bytes(root / name)).hexdigest()] for name in relative]
        size = spec.image_size
        x = FileArray(root, relative, (3, size, size), partial(read_normalised, size=size), spec.workers)
        return ArrayDataset(x, labels[keep], None), provenance
    # filled in place, one normalised image at a time: the split is held once, not as a list, a stack
    # and a normalised copy (normalise_images works per image, so the values are those of a batch call)
    images = np.empty((len(keep), 3, spec.image_size, spec.image_size), dtype=np.float32)
    provenance = []
    for row, index in enumerate(keep):
        pixels, digest = _read_image(paths[index], spec.image_size)
        images[row] = normalise_images(pixels)
        provenance.append([paths[index].relative_to(root).as_posix(), digest])
    return ArrayDataset(images, labels[keep], None), provenance


def stream_images(spec: DataSpec, train_images: int) -> bool:
    """Whether an ImageFolder streams: ``data.stream`` true/false, or for ``auto`` whether its
    ``train_images`` decoded float32 images would exceed :data:`STREAM_MEMORY_SHARE` of the memory
    available now (unknown available memory: in memory)."""
    if isinstance(spec.stream, bool):
        return spec.stream
    available = available_memory()
    decoded = train_images * 3 * spec.image_size**2 * 4
    return available is not None and decoded > STREAM_MEMORY_SHARE * available


def _folder_root(spec: DataSpec) -> Path:
    if spec.path is None:
        raise DataError(
            "data.name=imagefolder needs data.path: set it to a directory of class folders (--data-path DIR)"
        )
    root = Path(spec.path)
    if not root.is_dir():
        state = "is a file, not a directory" if root.exists() else "not found"
        raise DataError(
            f"{root}: {state}; set data.path to a directory of class folders ({_layout_hint(root)})"
        )
    return root


@DATASETS.register("imagefolder", aliases=("image-folder",))
def load_image_folder(
    spec: DataSpec, seed: int
) -> tuple[ArrayDataset | tuple[ArrayDataset, ArrayDataset], DatasetMeta]:
    """Images of a torchvision-style ImageFolder directory, read with Pillow and converted to RGB.

    With ``train/`` and ``val/`` subfolders the split is theirs (each part in a seeded random order)
    and the source returns ``(train, val)``; otherwise every subfolder is a class and
    :func:`edgekd.data.build_dataset` splits the images by ``data.val_fraction``.
    """
    root = _folder_root(spec)
    split_layout = (root / "train").is_dir() or (root / "val").is_dir()
    if split_layout:
        if not ((root / "train").is_dir() and (root / "val").is_dir()):
            missing = "val" if (root / "train").is_dir() else "train"
            raise DataError(f"{root}: has no {missing}/ folder; {_layout_hint(root)}")
        parts = {name: _class_files(root / name) for name in ("train", "val")}
        only_train = sorted(set(parts["train"]) - set(parts["val"]))
        only_val = sorted(set(parts["val"]) - set(parts["train"]))
        if only_train or only_val:
            raise DataError(
                f"{root}: train/ and val/ have different class folders (only in train: "
                f"{', '.join(only_train) or '-'}; only in val: {', '.join(only_val) or '-'}); "
                "give both the same class folders"
            )
        classes = sorted(parts["train"])
    else:
        parts = {"all": _class_files(root)}
        classes = sorted(parts["all"])
    if not any(files for part in parts.values() for files in part.values()):
        raise DataError(f"{root}: no images found ({', '.join(IMAGE_EXTENSIONS)}); {_layout_hint(root)}")
    if len(classes) < 2:
        raise DataError(
            f"{root}: found {len(classes)} class folder(s), need at least 2; {_layout_hint(root)}"
        )
    totals = {name: sum(len(files) for files in part.values()) for name, part in parts.items()}
    counts = {name: min(spec.max_frames or total, total) for name, total in totals.items()}
    kept = sum(counts.values())
    train_images = counts["train"] if split_layout else round(kept * (1 - spec.val_fraction))
    streamed = stream_images(spec, train_images)
    if not streamed:
        check_memory(
            image_memory(kept, spec.image_size),
            str(root),
            f"data.image_size={spec.image_size} for {kept} images (data.max_frames={spec.max_frames})",
            "lower data.image_size, set data.max_frames, or stream the images from disk (data.stream: true)",
        )
    loaded = {
        name: _load_split(root / ("" if name == "all" else name), files, classes, spec, seed, name, streamed)
        for name, files in parts.items()
    }
    settings = {
        "loader": "imagefolder",
        "files": {name: provenance for name, (_, provenance) in loaded.items()},
        "seed": seed,
        **spec.model_dump(include={"image_size", "max_frames"}),
        **({} if split_layout else {"val_fraction": spec.val_fraction}),
    }
    normalisation = image_normalisation(
        spec.image_size,
        "image file decoded with Pillow, converted to RGB, 8-bit values divided by 255",
        "PIL Image.resize, BILINEAR (Pillow antialiases when shrinking)",
    )
    first = next(iter(loaded.values()))[0]
    meta = _meta("imagefolder", first, classes, normalisation, settings, str(root), mirror_invariant=True)
    if not split_layout:
        return first, meta
    rng = seeded_rng(seed, "split")
    train, val = (loaded[name][0] for name in ("train", "val"))
    return (train.subset(rng.permutation(len(train))), val.subset(rng.permutation(len(val)))), meta
