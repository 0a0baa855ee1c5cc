"""Calibration data for post-training quantisation, with its provenance recorded.

Users of other tools complain that calibration sets are capped or empty without a word; here the
set is validated up front (one clear error naming the recipe field to change) and
:meth:`CalibrationSet.provenance` records where the data came from and how much of it was used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from edgekd.errors import QuantizeError

DEFAULT_BATCH = 32


class CalibrationSet:
    """The first ``requested`` samples of ``data`` ``(N, *input_shape)``, validated.

    ``dataset_fingerprint`` identifies the dataset the samples came from and ``preprocessing``
    describes what was done to them (both are recorded, not interpreted). Raises QuantizeError
    when fewer than ``min_samples`` samples would be used or the data is not finite numbers.
    """

    def __init__(
        self,
        data: np.ndarray,
        dataset_fingerprint: str,
        preprocessing: str,
        requested: int,
        min_samples: int,
    ) -> None:
        if requested < 1:
            raise QuantizeError(f"quantize.calibration_samples must be >= 1, got {requested}")
        if min_samples < 1:
            raise QuantizeError(f"quantize.min_calibration_samples must be >= 1, got {min_samples}")
        array = np.asarray(data)
        if not np.issubdtype(array.dtype, np.number) or array.ndim < 2:
            raise QuantizeError(
                f"calibration data must be a numeric array shaped (N, *input_shape), "
                f"got dtype {array.dtype} shape {array.shape}"
            )
        available = len(array)
        used = min(available, requested)
        if available < min_samples:
            raise QuantizeError(
                f"calibration set has {available} samples available but quantize.min_calibration_samples = "
                f"{min_samples} are required; use a larger dataset or lower quantize.min_calibration_samples"
            )
        if used < min_samples:
            raise QuantizeError(
                f"quantize.calibration_samples = {requested} is below quantize.min_calibration_samples = "
                f"{min_samples}; raise quantize.calibration_samples"
            )
        selected = np.ascontiguousarray(array[:used], dtype=np.float32)
        bad = int(np.size(selected) - np.count_nonzero(np.isfinite(selected)))
        if bad:
            raise QuantizeError(
                f"calibration data holds {bad} non-finite values (NaN/inf) in its first {used} samples; "
                f"fix the preprocessing ({preprocessing})"
            )
        self.data = selected
        self.dataset_fingerprint = dataset_fingerprint
        self.preprocessing = preprocessing
        self.requested = requested
        self.available = available
        self.min_samples = min_samples

    def __len__(self) -> int:
        return len(self.data)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def sha256(self) -> str:
        """Hash of the samples used (dtype, shape and bytes)."""
        digest = hashlib.sha256(f"{self.data.dtype.str}{self.data.shape}".encode())
        digest.update(self.data.tobytes())
        return digest.hexdigest()

    def provenance(self) -> dict:
        """Where the calibration data came from and how much of it is used."""
        return {
            "dataset_fingerprint": self.dataset_fingerprint,
            "samples_requested": self.requested,
            "samples_available": self.available,
            "samples_used": len(self.data),
            "min_samples": self.min_samples,
            "sample_shape": list(self.sample_shape),
            "preprocessing": self.preprocessing,
            "data_sha256": self.sha256(),
        }

    def reader(
        self, input_name: str, batch_size: int = DEFAULT_BATCH, drop_last: bool = False
    ) -> CalibrationDataReader:
        """An onnxruntime.quantization data reader over these samples (see :class:`CalibrationDataReader`)."""
        return CalibrationDataReader(self.data, input_name, batch_size, drop_last)


class CalibrationDataReader:
    """Feeds ``{input_name: batch}`` dicts to onnxruntime.quantization, then ``None``.

    Duck-typed to ``onnxruntime.quantization.CalibrationDataReader`` (whose ``__subclasshook__``
    accepts any class with ``get_next``), so this module imports nothing but numpy. ``drop_last``
    skips a final incomplete batch, for models whose batch axis is fixed; ``samples_yielded``
    counts the samples handed out.
    """

    def __init__(self, data: np.ndarray, input_name: str, batch_size: int, drop_last: bool) -> None:
        if batch_size < 1:
            raise QuantizeError(f"calibration batch size must be >= 1, got {batch_size}")
        stop = len(data) - len(data) % batch_size if drop_last else len(data)
        self._batches = [data[i : i + batch_size] for i in range(0, stop, batch_size)]
        self._input_name = input_name
        self._position = 0
        self.samples_yielded = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._position >= len(self._batches):
            return None
        batch = self._batches[self._position]
        self._position += 1
        self.samples_yielded += len(batch)
        return {self._input_name: batch}

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while (batch := self.get_next()) is not None:
            yield batch
