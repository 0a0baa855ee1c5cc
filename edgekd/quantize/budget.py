"""An accuracy budget for INT8: the largest top-1 drop allowed, and the labelled frames it is measured on.

Imports only numpy, so backends can take a budget without pulling in torch or a runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekd.errors import QuantizeError


@dataclass
class AccuracyBudget:
    """``max_drop``: largest absolute top-1 drop (FP32 minus INT8) accepted on the frames ``x``/``y``.

    ``provenance`` records where the frames came from (split, count, seed); they must not be the
    calibration frames.
    """

    max_drop: float
    x: np.ndarray
    y: np.ndarray
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_drop <= 1.0:
            raise QuantizeError(
                f"quantize.max_accuracy_drop must be between 0 and 1 (absolute top-1), got {self.max_drop}"
            )
        self.x = np.ascontiguousarray(self.x, dtype=np.float32)
        self.y = np.asarray(self.y)
        if len(self.x) == 0 or len(self.x) != len(self.y):
            raise QuantizeError(
                f"accuracy validation needs labelled frames: got {len(self.x)} inputs and {len(self.y)} "
                f"labels; raise quantize.accuracy_samples or use a larger dataset"
            )

    def __len__(self) -> int:
        return len(self.x)

    def accuracy(self, logits: np.ndarray) -> float:
        """Top-1 accuracy of ``logits`` ``(N, C)`` against this budget's labels."""
        return float(np.mean(np.asarray(logits).argmax(axis=1) == self.y))

    def record(self) -> dict[str, Any]:
        return {
            "max_drop": self.max_drop,
            "drop_type": "absolute top-1",
            "frames": len(self),
            **self.provenance,
        }
