"""A user's own data as numpy arrays: the ``npz`` dataset source (``data.name: npz:FILE``).

The file is a NumPy ``.npz`` archive (``np.savez`` / ``np.savez_compressed``) in one of two layouts:

- its own split: ``x_train``, ``y_train``, ``x_val``, ``y_val`` (each part in a seeded random order);
- one set: ``x``, ``y``, split here by ``data.val_fraction`` (stratified by class and group, as the
  built-in data).

Optional keys: ``classes`` (class names, one string per class; default ``"0"`` .. ``"C-1"`` with C the
largest label + 1) and per-sample ``groups`` (``groups_train`` / ``groups_val`` with the own split):
integers or strings the report breaks accuracy down by, like the radio task's per-SNR table.

Inputs may have any shape ``(N, ...)`` of rank >= 2. Float inputs are kept as they are (float32,
normalisation record ``{"type": "none"}``); uint8 inputs become float32 times 1/255 (``{"type":
"scale"}``), which a device reproduces from the record. Without labels (only ``x``, or ``x_train`` /
``x_val``) the data is *unlabelled*: labels are -1 and :attr:`DatasetMeta.labelled` is False, enough
for ``edgekd deploy`` (agreement with the float model) but not for training, see
:func:`edgekd.data.base.require_labels`.

The archive is read with ``np.load(allow_pickle=False)``: object arrays, whose loading would run
pickled code, are refused. The sizes are read from the archive's array headers before any array is,
so a file that cannot fit in memory fails at once.
"""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.data.base import (
    DATASETS,
    ArrayDataset,
    DatasetMeta,
    check_memory,
    seeded_rng,
    strata,
    stratified_pick,
)
from edgekd.errors import DataError
from edgekd.hashing import sha256_file, sha256_json
from edgekd.recipe import DataSpec

NPZ_VERSION = 1  # bump when reading or preprocessing changes (invalidates cached fingerprints)
SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val", "groups_train", "groups_val")
WHOLE_KEYS = ("x", "y", "groups")
KNOWN_KEYS = (*SPLIT_KEYS, *WHOLE_KEYS, "classes")
LAYOUT = (
    "expected keys x_train, y_train, x_val, y_val (own split) or x, y (split by data.val_fraction), "
    "optionally classes and groups (groups_train, groups_val); save with np.savez(FILE, x=..., y=...)"
)
UINT8_SCALE = 1.0 / 255.0
# Memory estimate (see edgekd.data.base.check_memory): the file's arrays as stored, plus the kept
# inputs as float32 this many times (converted, split into train/val, shuffled subsets).
FLOAT_COPIES = 3
# Integer groups are kept as they are within this range (the stratification key's); others get codes.
GROUP_RANGE = (-32768, 32767)
GROUP_NAME = "group"


def scale_inputs(x: np.ndarray, factor: float) -> np.ndarray:
    """``x`` as float32 times ``factor`` (uint8 pixels times 1/255): the ``scale`` preprocessing."""
    return np.asarray(x, dtype=np.float32) * np.float32(factor)


def unscale_inputs(x: np.ndarray, factor: float) -> np.ndarray:
    """The uint8 values :func:`scale_inputs` turned into ``x``: what the user feeds the device."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) / factor), 0, 255).astype(np.uint8)


def as_float32(x: np.ndarray) -> np.ndarray:
    """The ``none`` preprocessing: the inputs as float32, values unchanged."""
    return np.asarray(x, dtype=np.float32)


def scale_normalisation(factor: float = UINT8_SCALE) -> dict:
    return {
        "type": "scale",
        "description": f"uint8 values converted to float32 and multiplied by {factor!r} (1/255): [0, 1]",
        "factor": factor,
        "raw_dtype": "uint8",
    }


def no_normalisation(dtype: str) -> dict:
    return {
        "type": "none",
        "description": f"the file's {dtype} values as float32, no other preprocessing",
        "raw_dtype": dtype,
    }


@functools.lru_cache(maxsize=16)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_sha256(path: Path) -> str:
    """sha256 of a file, hashed once per (path, size, modification time) in this process."""
    stat = path.stat()
    return _cached_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _require_file(spec: DataSpec) -> Path:
    if spec.path is None:
        raise DataError("data.name=npz needs a file: use --data npz:FILE or set data.path to an .npz archive")
    path = Path(spec.path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "not found"
        raise DataError(f"{path}: {state}; point --data npz:FILE (data.path) at an .npz archive ({LAYOUT})")
    return path


def _headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in the archive, from the .npy headers (no data is read)."""
    not_npz = f"{path}: not an .npz archive"
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            single = handle.read(6) == b"\x93NUMPY"
        what = "a single .npy array" if single else "not a zip archive"
        raise DataError(f"{not_npz} ({what}); {LAYOUT}")
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    raise DataError(f"{not_npz}: member {member!r} is not a .npy array; {LAYOUT}")
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(handle)
                headers[member[: -len(".npy")]] = (tuple(shape), dtype)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{not_npz} or it is damaged ({str(exc).splitlines()[0]}); {LAYOUT}") from None
    return headers


def _layout(keys: set[str], path: Path) -> bool:
    """True for the own-split layout, False for ``x, y``; a missing or unknown key raises."""
    unknown = sorted(keys - set(KNOWN_KEYS))
    found = ", ".join(sorted(keys)) or "none"
    if unknown:
        raise DataError(f"{path}: unknown key(s) {', '.join(unknown)} (found: {found}); {LAYOUT}")
    split = bool(keys & set(SPLIT_KEYS))
    if split and keys & set(WHOLE_KEYS):
        raise DataError(
            f"{path}: mixes the own-split keys (x_train, ...) with x, y, groups (found: {found}); "
            "keep one layout"
        )
    required = ("x_train", "x_val") if split else ("x",)
    missing = [key for key in required if key not in keys]
    pairs = (("y_train", "y_val"), ("groups_train", "groups_val")) if split else ()
    for pair in pairs:  # both or neither
        if any(key in keys for key in pair):
            missing += [key for key in pair if key not in keys]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)} (found: {found}); {LAYOUT}")
    return split


def _memory(headers: dict[str, tuple[tuple[int, ...], np.dtype]], inputs: list[str], spec: DataSpec) -> int:
    stored = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in headers.values())
    kept = 0
    for key in inputs:
        shape = headers[key][0]
        rows = shape[0] if shape else 0
        rows = min(rows, spec.max_frames) if spec.max_frames is not None else rows
        kept += rows * int(np.prod(shape[1:])) * 4
    return stored + FLOAT_COPIES * kept


def _read(archive: Any, key: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(archive[key])
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise DataError(
                f"{path}: key {key!r} holds Python objects (an object array), which are not read "
                "(loading them would run pickled code); save numeric or string arrays"
            ) from None
        raise DataError(f"{path}: key {key!r} cannot be read ({exc}); save the file again") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: key {key!r} cannot be read ({exc}); the file is damaged") from None


def _check_inputs(x: np.ndarray, key: str, path: Path) -> None:
    if x.dtype.hasobject:
        raise DataError(f"{path}: key {key!r} holds Python objects; save a float or uint8 array")
    if x.ndim < 2:
        raise DataError(
            f"{path}: key {key!r} has shape {x.shape}, need (N, ...) of rank >= 2 (one row per sample); "
            "reshape it, e.g. x[:, None] for scalar samples"
        )
    if x.size == 0:
        raise DataError(f"{path}: key {key!r} is empty (shape {x.shape}); save at least one sample of data")
    if not (np.issubdtype(x.dtype, np.floating) or x.dtype == np.uint8):
        raise DataError(
            f"{path}: key {key!r} holds {x.dtype} values; save float inputs (kept as they are) or uint8 "
            "(scaled by 1/255), e.g. x.astype(np.float32)"
        )
    if np.issubdtype(x.dtype, np.floating):
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if not finite.all():
            bad_values = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            first = int(np.flatnonzero(~finite)[0])
            raise DataError(
                f"{path}: key {key!r} holds {bad_values} NaN/Inf value(s), first in sample {first}; "
                "remove or repair those samples"
            )


def _check_vector(values: np.ndarray, key: str, samples: int, x_key: str, path: Path) -> None:
    if values.ndim != 1 or len(values) != samples:
        raise DataError(
            f"{path}: key {key!r} has shape {values.shape} but {x_key!r} holds {samples} samples; "
            f"save one value per sample (shape ({samples},))"
        )


def _labels(y: np.ndarray, key: str, samples: int, x_key: str, path: Path) -> np.ndarray:
    _check_vector(y, key, samples, x_key, path)
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{path}: key {key!r} holds {y.dtype} values, labels must be integer class indices 0..C-1; "
            "save y.astype(np.int64) (class names go in the key 'classes')"
        )
    labels = y.astype(np.int64)
    if labels.min() < 0:
        first = int(np.flatnonzero(labels < 0)[0])
        raise DataError(
            f"{path}: key {key!r} holds negative label {int(labels[first])} (sample {first}); "
            "labels are class indices 0..C-1"
        )
    return labels


def _classes(archive: Any, keys: set[str], labels: list[np.ndarray], path: Path) -> list[str]:
    """The class names: the file's ``classes`` (checked against the labels) or "0".."C-1"."""
    largest = max((int(y.max()) for y in labels if len(y)), default=-1)
    if "classes" not in keys:
        return [str(i) for i in range(largest + 1)]
    names = _read(archive, "classes", path)
    if names.ndim != 1 or len(names) == 0 or names.dtype.kind not in "US":
        raise DataError(
            f"{path}: key 'classes' has shape {names.shape} and dtype {names.dtype}; save one string per "
            "class, e.g. np.array(['cat', 'dog'])"
        )
    classes = [_text(name) for name in names]
    duplicates = sorted({name for name in classes if classes.count(name) > 1})
    if duplicates:
        repeated = ", ".join(map(repr, duplicates))
        raise DataError(f"{path}: key 'classes' repeats {repeated}; name each class once")
    if largest >= len(classes):
        raise DataError(
            f"{path}: key 'classes' has {len(classes)} name(s) but the labels go up to {largest}; labels "
            f"must be 0..{len(classes) - 1}: give one name per class or fix the labels"
        )
    return classes


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _groups(
    parts: list[np.ndarray | None], keys: list[str], counts: list[int], x_keys: list[str], path: Path
) -> tuple[list[np.ndarray | None], list[str] | None]:
    """Per-sample group codes of each part and, for string (or out-of-range) groups, their names."""
    if parts[0] is None:
        return parts, None
    for values, key, count, x_key in zip(parts, keys, counts, x_keys, strict=True):
        _check_vector(values, key, count, x_key, path)
        if values.dtype.kind not in "iuUS":
            raise DataError(
                f"{path}: key {key!r} holds {values.dtype} values; groups must be integers (e.g. SNR in dB) "
                "or strings"
            )
    kinds = {values.dtype.kind in "iu" for values in parts}
    if len(kinds) > 1:
        raise DataError(f"{path}: keys {', '.join(keys)} mix integer and string groups; use one kind")
    if kinds == {True}:
        low = min(int(values.min()) for values in parts)
        high = max(int(values.max()) for values in parts)
        if GROUP_RANGE[0] <= low and high <= GROUP_RANGE[1]:
            return [values.astype(np.int64) for values in parts], None
        names, codes = np.unique(np.concatenate(parts), return_inverse=True)
        labels = [str(int(value)) for value in names]
    else:
        texts = [np.asarray([_text(v) for v in values], dtype=str) for values in parts]
        names, codes = np.unique(np.concatenate(texts), return_inverse=True)
        labels = [str(value) for value in names]
    codes = codes.reshape(-1).astype(np.int64)
    bounds = np.cumsum([0, *counts])
    return [codes[start:stop] for start, stop in zip(bounds[:-1], bounds[1:], strict=True)], labels


def _cap(y: np.ndarray, groups: np.ndarray | None, spec: DataSpec, seed: int, stream: str) -> np.ndarray:
    """Indices of the rows kept under ``data.max_frames`` (stratified by class and group)."""
    if spec.max_frames is None or spec.max_frames >= len(y):
        return np.arange(len(y))
    return stratified_pick(strata(y, groups), spec.max_frames, seeded_rng(seed, f"max-frames-{stream}"))


@DATASETS.register("npz")
def load_npz(
    spec: DataSpec, seed: int
) -> tuple[ArrayDataset | tuple[ArrayDataset, ArrayDataset], DatasetMeta]:
    """The arrays of a NumPy ``.npz`` archive (see the module docstring for its keys and checks).

    ``data.max_frames`` caps the rows of each part (stratified by class and group); with the ``x, y``
    layout :func:`edgekd.data.build_dataset` then holds out ``data.val_fraction``.
    """
    path = _require_file(spec)
    headers = _headers(path)
    keys = set(headers)
    split = _layout(keys, path)
    names = ("train", "val") if split else ("all",)
    x_keys = ["x_train", "x_val"] if split else ["x"]
    y_keys = ["y_train", "y_val"] if split else ["y"]
    g_keys = ["groups_train", "groups_val"] if split else ["groups"]
    for key in keys:
        if headers[key][1].hasobject:
            raise DataError(
                f"{path}: key {key!r} holds Python objects (an object array), which are not read "
                "(loading them would run pickled code); save numeric or string arrays"
            )
    shapes = [headers[key][0] for key in x_keys]
    check_memory(
        _memory(headers, x_keys, spec),
        str(path),
        f"data.path (inputs {' and '.join(f'{k} {s}' for k, s in zip(x_keys, shapes, strict=True))}, "
        f"data.max_frames={spec.max_frames})",
        "set data.max_frames or use a smaller file",
    )
    labelled = y_keys[0] in keys
    with np.load(path, allow_pickle=False) as archive:
        xs = [_read(archive, key, path) for key in x_keys]
        for x, key in zip(xs, x_keys, strict=True):
            _check_inputs(x, key, path)
        if split:
            if xs[0].shape[1:] != xs[1].shape[1:]:
                raise DataError(
                    f"{path}: x_train samples have shape {xs[0].shape[1:]} but x_val samples "
                    f"{xs[1].shape[1:]}; give both splits the same sample shape"
                )
            if (xs[0].dtype == np.uint8) != (xs[1].dtype == np.uint8):
                raise DataError(
                    f"{path}: x_train is {xs[0].dtype} but x_val is {xs[1].dtype}; store both as uint8 or "
                    "both as float, so they get the same preprocessing"
                )
        counts = [len(x) for x in xs]
        if labelled:
            ys = [
                _labels(_read(archive, key, path), key, count, x_key, path)
                for key, count, x_key in zip(y_keys, counts, x_keys, strict=True)
            ]
        else:
            ys = [np.full(n, -1, dtype=np.int64) for n in counts]
        classes = _classes(archive, keys, ys if labelled else [], path)
        raw_groups = [_read(archive, key, path) if key in keys else None for key in g_keys]
    groups, group_labels = _groups(raw_groups, g_keys, counts, x_keys, path)
    uint8 = xs[0].dtype == np.uint8
    parts = []
    for name, x, y, g in zip(names, xs, ys, groups, strict=True):
        index = _cap(y, g, spec, seed, name)
        kept_x = scale_inputs(x[index], UINT8_SCALE) if uint8 else as_float32(x[index])
        parts.append(ArrayDataset(kept_x, y[index], None if g is None else g[index]))
    settings = {
        "loader": "npz",
        "version": NPZ_VERSION,
        "file_sha256": file_sha256(path),
        "seed": seed,
        **spec.model_dump(include={"max_frames"}),
        **({} if split else {"val_fraction": spec.val_fraction}),
    }
    meta = DatasetMeta(
        name="npz",
        task="classification",
        input_shape=tuple(parts[0].x.shape[1:]),
        classes=classes,
        normalisation=scale_normalisation() if uint8 else no_normalisation(str(xs[0].dtype)),
        fingerprint=sha256_json(settings),
        source=str(path),
        labelled=labelled,
        group_name=GROUP_NAME,
        group_labels=group_labels,
    )
    if not split:
        return parts[0], meta
    rng = seeded_rng(seed, "split")
    train, val = parts
    return (train.subset(rng.permutation(len(train))), val.subset(rng.permutation(len(val)))), meta
