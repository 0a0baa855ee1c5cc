"""Datasets: a registry of sources, each giving (train, val, meta) from a recipe's ``data`` section.

Built in: ``radio-synthetic`` (default, no download), ``rml2016`` / ``rml2016.10a`` and
``rml2018`` / ``rml2018.01a`` (see :mod:`edgekd.data.radio`); ``digits`` (scikit-learn's, no
download) and ``imagefolder`` (see :mod:`edgekd.data.vision`); ``npz`` (a user's own arrays, see
:mod:`edgekd.data.arrays`); for detection, ``scenes`` (built in), ``coco`` and ``yolo`` (see
:mod:`edgekd.data.detection_sources`). An ImageFolder can stream from disk (``data.stream``,
:mod:`edgekd.data.streaming`); the other sources are held in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from edgekd.data import detection_sources  # noqa: F401  (registers scenes, coco, yolo)
from edgekd.data.arrays import as_float32, scale_inputs, unscale_inputs
from edgekd.data.base import (
    DATASETS,
    NORMALISATION,
    ArrayDataset,
    DatasetMeta,
    normalise_frames,
    require_classes,
    require_labels,
    stratified_split,
)
from edgekd.data.radio import MODULATIONS, RML2018_CLASSES, SNR_LEVELS, synthesize
from edgekd.data.streaming import FileArray, is_streamed
from edgekd.data.vision import IMAGE_NORMALISATION, denormalise_images, normalise_images
from edgekd.errors import RecipeError
from edgekd.recipe import DataSpec
from edgekd.tasks import DETECTION, task_of

STREAMING_SOURCES = ("imagefolder",)  # registry names of the sources that can stream (data.stream)

__all__ = [
    "DATASETS",
    "MODULATIONS",
    "NORMALISATION",
    "RML2018_CLASSES",
    "SNR_LEVELS",
    "ArrayDataset",
    "DatasetMeta",
    "FileArray",
    "build_dataset",
    "is_streamed",
    "normalise_frames",
    "normalise_images",
    "raw_and_preprocess",
    "require_labels",
    "synthesize",
]


def build_dataset(
    spec: DataSpec, seed: int, data_dir: Path | None = None
) -> tuple[ArrayDataset, ArrayDataset, DatasetMeta]:
    """(train, val, meta) for ``spec``: the source named ``spec.name``, split by (class, SNR).

    ``spec.val_fraction`` of the frames is held out, stratified and deterministic from ``seed``,
    unless the source comes with its own split. An unknown name raises
    :class:`~edgekd.errors.RecipeError` listing the known ones; a missing or malformed file, a size
    that cannot fit in memory, or fewer than two classes (in the train frames) raise
    :class:`~edgekd.errors.DataError`. Unlabelled data (``meta.labelled`` False, labels -1) is built
    without the class check; callers that train call :func:`require_labels`. ``data.stream: true``
    on a source that cannot stream (all but ``imagefolder``) is a :class:`~edgekd.errors.RecipeError`.

    A detection source (``scenes``, ``coco``, ``yolo``: :mod:`edgekd.data.detection_sources`) gives
    its own split of :class:`~edgekd.detection.data.DetectionDataset` and ``meta.task ==
    "detection"``; ``data_dir`` is where the built-in scenes are written (the run's
    ``<runs_dir>/../data``; default ``$EDGEKD_DATA_DIR`` or ``models/data``).
    """
    builder = DATASETS.get(spec.name)
    if spec.stream is True and DATASETS.canonical(spec.name) not in STREAMING_SOURCES:
        raise RecipeError(
            f"data.stream=true: dataset {spec.name!r} is held in memory and cannot stream (only "
            f"{', '.join(STREAMING_SOURCES)} can); set data.stream: auto or false"
        )
    if task_of(spec.name) == DETECTION:  # DetectionDataset splits, checked by their loaders
        (train, val), meta = builder(spec, seed, data_dir)
        return train, val, meta
    data, meta = builder(spec, seed)
    hint = "use a dataset of several classes (check data.path, data.snr_min/snr_max and data.max_frames)"
    if isinstance(data, tuple):  # the source's own (train, val) split
        if meta.labelled:
            require_classes(data[0], meta.classes, meta.source, hint)
        return data[0], data[1], meta
    if meta.labelled:
        require_classes(data, meta.classes, meta.source, hint)
    train, val = stratified_split(data, spec.val_fraction, seed, meta.source)
    return train, val, meta


def raw_and_preprocess(
    meta: DatasetMeta, x: np.ndarray
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Raw inputs and the numpy preprocessing that turns them into the model inputs ``x``.

    What end-to-end latency times: images in [0, 1] and their mean/std normalisation; uint8 arrays
    and their scaling to float32 (npz ``scale``); float arrays as they are (npz ``none``: only the
    float32 conversion); or IQ frames and their per-frame power normalisation (idempotent, so the
    frames are their own raw form).
    """
    kind = meta.normalisation.get("type")
    if kind == IMAGE_NORMALISATION:
        mean, std = tuple(meta.normalisation["mean"]), tuple(meta.normalisation["std"])
        return denormalise_images(x, mean, std), partial(normalise_images, mean=mean, std=std)
    if kind == "scale":
        factor = float(meta.normalisation["factor"])
        return unscale_inputs(x, factor), partial(scale_inputs, factor=factor)
    if kind == "none":
        return x, as_float32
    return x, normalise_frames
