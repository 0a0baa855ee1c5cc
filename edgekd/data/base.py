"""Dataset containers, the dataset registry, per-frame normalisation and stratified sampling.

Every dataset source returns one :class:`ArrayDataset` (all kept frames, already normalised) and
its :class:`DatasetMeta`; :func:`edgekd.data.build_dataset` then splits it into train and val with
:func:`stratified_split`. A source whose files come split (e.g. an ImageFolder with train/ and
val/) returns that ``(train, val)`` pair instead.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from edgekd.data.streaming import FileArray
from edgekd.errors import DataError
from edgekd.recipe import DataSpec
from edgekd.registry import Registry


@dataclass
class ArrayDataset:
    """Frames with labels and (optionally) their SNR, or another per-sample group.

    ``x`` is an in-memory array, or for a streamed source a :class:`~edgekd.data.streaming.FileArray`
    that decodes the files it is indexed with (same shapes, dtype and values). ``snr`` keeps its name
    for the radio sources; for others it holds integer group codes, which
    :attr:`DatasetMeta.group_name` and :attr:`DatasetMeta.group_labels` describe.
    """

    # float32, already normalised: (N, 2, L) IQ frames (row 0 = I, row 1 = Q) or (N, 3, H, W) images
    x: np.ndarray | FileArray
    y: np.ndarray  # int64 (N,) class indices into DatasetMeta.classes
    snr: np.ndarray | None  # integer (N,): SNR in dB per frame, or group codes (DatasetMeta); None if unknown

    def __post_init__(self) -> None:
        lengths = {len(self.x), len(self.y)} | ({len(self.snr)} if self.snr is not None else set())
        if len(lengths) != 1:
            raise ValueError(f"x, y and snr must have the same length, got {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """The frames at ``indices``, in that order (copies; a streamed ``x`` stays on disk)."""
        snr = self.snr[indices] if self.snr is not None else None
        x = self.x.take(indices) if isinstance(self.x, FileArray) else self.x[indices]
        return ArrayDataset(x, self.y[indices], snr)


@dataclass
class DatasetMeta:
    """What a model, a calibration set or a device needs to know about a dataset."""

    name: str  # registry name of the source, e.g. "radio-synthetic"
    task: str  # "classification"
    input_shape: tuple[int, ...]  # per sample, e.g. (2, 128)
    classes: list[str]
    normalisation: dict  # exactly the preprocessing applied, so a device can reproduce it
    fingerprint: str  # sha256 of the generating spec + seed, or of the file + spec
    source: str  # human description: generator and seed, or the file path
    mirror_invariant: bool = False  # a horizontally mirrored input keeps its class (image augmentation)
    labelled: bool = True  # False: every label is -1 (npz without y); fine for deploy, not for training
    # What ArrayDataset.snr holds when set: its name in the report ("SNR (dB)" for the radio sources)
    # and, for string groups stored as codes 0..G-1, the name of each code (None: the codes are values).
    group_name: str = "SNR (dB)"
    group_labels: list[str] | None = None

    def to_dict(self) -> dict:
        """JSON-able form (tuples become lists)."""
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data


# A source returns all its frames (split by build_dataset) or its own (train, val) split, and the meta.
DatasetBuilder = Callable[
    [DataSpec, int], tuple[ArrayDataset | tuple[ArrayDataset, ArrayDataset], DatasetMeta]
]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")

MIN_CLASSES = 2  # a classifier of one class is right by construction: its accuracy says nothing
# Shortest IQ frame a file may hold: the recipe's lower bound for data.frame_length (the models'
# own minimum, e.g. after their pooling, is checked by a forward pass before training).
MIN_FRAME_LENGTH = 16

NORMALISATION_EPS = 1e-12
NORMALISATION = {
    "type": "per-frame-rms",
    "description": (
        "each frame x of shape (2, L) (row 0 = I, row 1 = Q) is divided by "
        "sqrt(mean over t of (I_t^2 + Q_t^2) + eps), giving unit average power; computed in float32"
    ),
    "eps": NORMALISATION_EPS,
}


def normalise_frames(x: np.ndarray) -> np.ndarray:
    """Scale every (2, L) IQ frame in ``x`` (shape (..., 2, L)) to unit average power.

    This is the preprocessing recorded in :data:`NORMALISATION`; apply the same function to frames
    at inference. An all-zero frame stays zero.
    """
    frames = np.asarray(x, dtype=np.float32)
    power = np.mean(np.sum(frames * frames, axis=-2, keepdims=True), axis=-1, keepdims=True)
    return frames / np.sqrt(power + np.float32(NORMALISATION_EPS))


def seeded_rng(seed: int, stream: str) -> np.random.Generator:
    """An independent random stream named ``stream`` derived from the recipe ``seed``."""
    return np.random.default_rng([seed % 2**63, zlib.crc32(stream.encode("utf-8"))])


def strata(y: np.ndarray, snr: np.ndarray | None) -> np.ndarray:
    """One integer key per frame identifying its (class, SNR) group (class only without SNR)."""
    keys = np.asarray(y, dtype=np.int64) * 65536
    return keys if snr is None else keys + (np.asarray(snr, dtype=np.int64) + 32768)


def stratified_pick(keys: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``k`` items where every group (equal key) gets its proportional share.

    Each group gets ``floor(size * k / n)`` items; the few left over go to the groups with the
    largest fractional remainder (ties broken at random). Members of a group are chosen at random.
    """
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    quota = counts * (k / len(keys))
    take = np.floor(quota).astype(np.int64)
    leftover = k - int(take.sum())
    by_remainder = np.lexsort((rng.random(len(counts)), -(quota - take)))
    take[by_remainder[:leftover]] += 1
    order = np.lexsort((rng.random(len(keys)), inverse))  # grouped, random within a group
    rank = np.arange(len(keys)) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.sort(order[rank < take[inverse[order]]])


def stratified_split(
    data: ArrayDataset, val_fraction: float, seed: int, source: str
) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, val) with ``round(N * val_fraction)`` frames held out per (class, SNR) proportion.

    Deterministic from ``seed``; both parts come in a seeded random order (never class-sorted), so
    taking the first frames of either part gives a mix of classes and SNRs.
    """
    n_val = round(len(data) * val_fraction)
    if not 0 < n_val < len(data):
        raise DataError(
            f"{source}: {len(data)} frames are too few to hold out val_fraction={val_fraction}; "
            "use more frames or change data.val_fraction"
        )
    rng = seeded_rng(seed, "split")
    val = stratified_pick(strata(data.y, data.snr), n_val, rng)
    train = np.setdiff1d(np.arange(len(data)), val, assume_unique=True)
    return data.subset(rng.permutation(train)), data.subset(rng.permutation(val))


def hide_labels(data: ArrayDataset, keep_fraction: float, seed: int) -> ArrayDataset:
    """A copy of ``data`` whose labels are kept for ``keep_fraction`` of frames and set to -1 elsewhere.

    The labelled frames are a seeded stratified pick (every (class, SNR) group keeps its share), the
    usual semi-supervised protocol; the frames themselves are unchanged.
    """
    if keep_fraction >= 1.0:
        return data
    keep = stratified_pick(
        strata(data.y, data.snr), max(1, round(len(data) * keep_fraction)), seeded_rng(seed, "labels")
    )
    labels = np.full_like(data.y, -1)
    labels[keep] = data.y[keep]
    return ArrayDataset(data.x, labels, data.snr)


def require_classes(data: ArrayDataset, classes: list[str], source: str, hint: str) -> None:
    """:class:`DataError` unless ``data`` holds frames of at least :data:`MIN_CLASSES` classes.

    One class would train and "deploy" at accuracy 1.0 while distinguishing nothing. ``hint`` says
    which recipe field or file to change.
    """
    present = np.unique(data.y[data.y >= 0]) if len(data) else np.empty(0, dtype=np.int64)
    if len(present) >= MIN_CLASSES:
        return
    names = ", ".join(classes[int(i)] if 0 <= int(i) < len(classes) else str(int(i)) for i in present)
    raise DataError(
        f"{source}: the kept frames hold {len(present)} class{'es' if len(present) != 1 else ''}"
        f"{f' ({names})' if names else ''}, a classifier needs at least {MIN_CLASSES}; {hint}"
    )


def require_labels(meta: DatasetMeta, what: str) -> None:
    """:class:`DataError` when ``meta`` describes unlabelled data and ``what`` (e.g. "compress") needs labels.

    Unlabelled data (an npz without ``y``) is enough to quantise, compile and measure agreement with
    the float model (``edgekd deploy``), not to train or distil.
    """
    if not meta.labelled:
        raise DataError(
            f"{meta.source}: the data has no labels (no y / y_train, y_val), but {what} needs them; add "
            "integer class labels to the file, or use edgekd deploy, which measures agreement without labels"
        )


def require_finite(values: np.ndarray, source: str, what: str) -> None:
    """:class:`DataError` naming ``what`` (e.g. the file's dataset key) if ``values`` hold NaN or inf."""
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise DataError(
            f"{source}: {what} holds {bad} non-finite value(s) (NaN/inf); the file is damaged, "
            "download it again or remove those frames"
        )


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now, or None where this cannot be told.

    Linux's ``MemAvailable`` (/proc/meminfo: free memory plus reclaimable caches), else the free
    physical pages from ``os.sysconf``. Container limits are not considered.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gigabytes(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


def check_memory(estimate: float, source: str, culprit: str, remedy: str) -> None:
    """:class:`DataError` when building a dataset would need more than the available memory.

    ``estimate`` is a rough peak in bytes (the arrays and their working copies, see each source);
    ``culprit`` names the recipe field(s) behind it and ``remedy`` what to lower. Checked before
    anything is allocated, so a size that cannot fit fails in a second instead of swapping or
    being killed mid-run.
    """
    available = available_memory()
    if available is not None and estimate > available:
        raise DataError(
            f"{source}: {culprit} needs about {_gigabytes(estimate)} of memory to build the dataset, "
            f"but only {_gigabytes(available)} is available; {remedy}"
        )
