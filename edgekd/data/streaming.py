"""Data streamed from disk: samples decoded per batch, in ``torch.utils.data.DataLoader`` worker processes.

A streamed source (an ImageFolder, :mod:`edgekd.data.vision`) keeps only its file paths and labels
in memory; its :attr:`ArrayDataset.x <edgekd.data.base.ArrayDataset.x>` is a :class:`FileArray`, an
array-like that decodes the files it is indexed with (``x[i]``, ``x[a:b]``, ``x[index_array]`` give
float32 ndarrays), so small consumers (a calibration subset, an evaluation slice) work unchanged.

Whole-set passes (training epochs, the teacher-output pass, evaluation) go through
:func:`load_batches`: for a :class:`FileArray` it drives a ``DataLoader`` whose batch sampler is the
caller's own list of index batches (the trainer's seeded permutation), so a streamed run visits
exactly the batches an in-memory run visits, and decoding plus the augmentation bank run in
``data.workers`` worker processes, seeded from the run's seed. In-memory arrays are indexed directly.

Which is faster where (``benchmarks/streaming_memory.py``, results/streaming_memory.json: a generated
folder of 32x32 PNGs, one epoch of edgekd's teacher stage on ``timm:mobilenetv3_small_050``, this
project's shared 2-core CPU): at 4,000 images, in memory 296.6 samples/s, streamed with 2 workers
234.3 samples/s (the JSON's ``samples_per_s``; its other rows are larger folders). Decoding a PNG
per visit costs more than holding it decoded, so the built-in sets (radio-synthetic, digits, npz),
which fit in memory, stay in memory, and an ImageFolder streams only when it would not fit
(``data.stream: auto``).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from edgekd.errors import EdgekdError

WORKER_START = "forkserver"  # how DataLoader workers start (see load_batches)

# what a reader returns per file: one decoded, normalised sample
Reader = Callable[[str], np.ndarray]


class FileArray:
    """A read-only array of samples decoded from files on demand: ``(N, *sample_shape)`` float32.

    Paths are held as one bytes array (no per-path Python objects, so forked DataLoader workers share
    its pages instead of copying them on reference-count updates). ``reader`` must be picklable (a
    module-level function or a ``functools.partial`` of one): worker processes call it.
    ``workers`` is how many DataLoader workers :func:`load_batches` uses for a whole-set pass.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        files: Sequence[str] | np.ndarray,
        sample_shape: tuple[int, ...],
        reader: Reader,
        workers: int = 0,
    ) -> None:
        self.root = os.fspath(root)
        encoded = files if isinstance(files, np.ndarray) else [os.fsencode(name) for name in files]
        self.files = np.asarray(encoded, dtype=np.bytes_) if len(encoded) else np.empty(0, dtype="S1")
        self.sample_shape = tuple(sample_shape)
        self.reader, self.workers = reader, workers
        self.dtype = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.files), *self.sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)

    @property
    def nbytes(self) -> int:
        """Bytes the decoded array would take (what streaming saves)."""
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"FileArray({len(self)} files under {self.root!r}, sample shape {self.sample_shape})"

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.files[index]))

    def _indices(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(len(self))[key]
        indices = np.asarray(key)
        if indices.dtype == bool:
            if indices.shape != (len(self),):
                raise IndexError(f"boolean index of shape {indices.shape} for {len(self)} samples")
            return np.flatnonzero(indices)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise IndexError(f"FileArray takes an int, a slice or a 1-d integer/boolean array, got {key!r}")
        return np.where(indices < 0, indices + len(self), indices)

    def __getitem__(self, key: Any) -> np.ndarray:
        """Decoded float32 samples: one ``sample_shape`` array for an int, else ``(k, *sample_shape)``."""
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"index {key} out of range for {len(self)} samples")
            return np.asarray(self.reader(self.path(index)), dtype=np.float32)
        indices = self._indices(key)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices out of range for {len(self)} samples")
        out = np.empty((len(indices), *self.sample_shape), dtype=np.float32)
        for row, index in enumerate(indices):
            out[row] = self.reader(self.path(int(index)))
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every sample decoded (``np.asarray(x)``): the whole set in memory, as the in-memory path."""
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)

    def take(self, indices: np.ndarray) -> FileArray:
        """The samples at ``indices``, still on disk (what :meth:`ArrayDataset.subset` keeps lazy)."""
        return FileArray(
            self.root, self.files[self._indices(indices)], self.sample_shape, self.reader, self.workers
        )


def is_streamed(x: Any) -> bool:
    """Whether ``x`` is decoded from disk per batch (a :class:`FileArray`) rather than held in memory."""
    return isinstance(x, FileArray)


class BankView:
    """An augmentation bank at fixed per-sample variants: ``view(batch, indices)`` (picklable for workers)."""

    def __init__(self, bank: Any, variants: np.ndarray) -> None:
        self.bank, self.variants = bank, variants

    def __call__(self, x: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        return self.bank.apply(x, indices, self.variants[indices])


class _Failed:
    """An edgekd error raised in a worker, carried back as a value (DataLoader would rewrap it in
    a multi-line message; the user sees the original one-line error)."""

    def __init__(self, error: EdgekdError) -> None:
        self.error = error


class _BatchDataset(torch.utils.data.Dataset):
    """The map-style dataset a DataLoader worker decodes a whole batch from (``__getitems__``)."""

    def __init__(self, x: FileArray, transform: Callable[[torch.Tensor, np.ndarray], torch.Tensor] | None):
        self.x, self.transform = x, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, indices: list[int]) -> tuple[np.ndarray, torch.Tensor] | _Failed:
        rows = np.asarray(indices, dtype=np.int64)
        try:
            batch = torch.from_numpy(self.x[rows])
            if self.transform is not None:
                batch = self.transform(batch, rows)
        except EdgekdError as exc:
            return _Failed(exc)
        return rows, batch

    def __getitem__(self, index: int) -> tuple[np.ndarray, torch.Tensor] | _Failed:
        return self.__getitems__([index])


def _as_is(batch: Any) -> Any:
    return batch


def _seed_worker(worker_id: int) -> None:
    """Seed a worker's numpy and ``random`` from its torch seed (itself drawn from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _iterate_keeping_sigchld(loader: torch.utils.data.DataLoader) -> Any:
    """``iter(loader)``, with this process's SIGCHLD disposition left as it was.

    torch's first multi-worker iterator installs a Python-level SIGCHLD handler for the rest of the
    process, to notice a worker that dies. Our workers are children of the forkserver, not of this
    process, so that handler never sees them (torch also polls its workers, which is what notices a
    dead one here). And a Python-level handler runs on the thread's alternate signal stack
    (SA_ONSTACK): OpenVINO's CPU plugin installs one per ``ov.Core`` and, when two Cores are released
    in the order they were made, leaves the thread on an unmapped one, so with torch's handler in place
    the next child exit (any subprocess) crashed this process with SIGSEGV, or wrote the signal frame
    over memory reused by then (a corrupted heap, a crash later elsewhere).
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGCHLD) if main else None  # None too: installed from C
    try:
        return iter(loader)
    finally:
        if previous is not None and signal.getsignal(signal.SIGCHLD) is not previous:
            signal.signal(signal.SIGCHLD, previous)


def load_batches(
    x: np.ndarray | FileArray,
    batches: Sequence[np.ndarray],
    transform: Callable[[torch.Tensor, np.ndarray], torch.Tensor] | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """``(indices, inputs)`` for each index array of ``batches``, in that order, ``transform`` applied.

    In-memory ``x``: indexed here. A :class:`FileArray`: decoded (and transformed) by a DataLoader
    with ``workers`` processes (default ``x.workers``; 0 decodes here) whose batch sampler is
    ``batches`` itself, so the batches are the very same; workers are seeded from ``seed``.
    """
    if not is_streamed(x):
        for indices in batches:
            batch = torch.from_numpy(np.ascontiguousarray(x[indices]))
            yield indices, (transform(batch, indices) if transform is not None else batch)
        return
    assert isinstance(x, FileArray)
    workers = x.workers if workers is None else workers
    if workers:
        multiprocessing.set_forkserver_preload(["torch", "numpy", "PIL.Image", __name__])
    loader = torch.utils.data.DataLoader(
        _BatchDataset(x, transform),
        batch_sampler=[np.asarray(indices, dtype=np.int64).tolist() for indices in batches],
        num_workers=workers,
        collate_fn=_as_is,
        worker_init_fn=_seed_worker if workers else None,
        # Workers fork from a clean server process (preloaded with torch), never from this one: a fork
        # of a process holding other runtimes' threads (OpenVINO, ONNX Runtime, LiteRT) can crash.
        multiprocessing_context=WORKER_START if workers else None,
        generator=torch.Generator().manual_seed(seed % 2**63),
    )
    batches_iter = _iterate_keeping_sigchld(loader)
    try:
        for item in batches_iter:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:  # workers stop here, not whenever the garbage collector finds an abandoned iterator
        shutdown = getattr(batches_iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def index_batches(count: int, batch_size: int) -> list[np.ndarray]:
    """``0..count-1`` in consecutive batches of ``batch_size`` (the last may be shorter)."""
    return [np.arange(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
