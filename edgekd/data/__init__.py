"""Datasets: a registry of sources, each giving (train, val, meta) from a recipe's ``data`` section.

Built in: ``radio-synthetic`` (default, no download), ``rml2016`` / ``rml2016.10a`` and
``rml2018`` / ``rml2018.01a`` (see :mod:`edgekd.data.radio`).
"""

from __future__ import annotations

from edgekd.data.base import (
    DATASETS,
    NORMALISATION,
    ArrayDataset,
    DatasetMeta,
    normalise_frames,
    stratified_split,
)
from edgekd.data.radio import MODULATIONS, RML2018_CLASSES, SNR_LEVELS, synthesize
from edgekd.recipe import DataSpec

__all__ = [
    "DATASETS",
    "MODULATIONS",
    "NORMALISATION",
    "RML2018_CLASSES",
    "SNR_LEVELS",
    "ArrayDataset",
    "DatasetMeta",
    "build_dataset",
    "normalise_frames",
    "synthesize",
]


def build_dataset(spec: DataSpec, seed: int) -> tuple[ArrayDataset, ArrayDataset, DatasetMeta]:
    """(train, val, meta) for ``spec``: the source named ``spec.name``, split by (class, SNR).

    ``spec.val_fraction`` of the frames is held out, stratified and deterministic from ``seed``.
    An unknown name raises :class:`~edgekd.errors.RecipeError` listing the known ones; a missing or
    malformed file raises :class:`~edgekd.errors.DataError`.
    """
    data, meta = DATASETS.get(spec.name)(spec, seed)
    train, val = stratified_split(data, spec.val_fraction, seed, meta.source)
    return train, val, meta
