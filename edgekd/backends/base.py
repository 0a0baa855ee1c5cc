"""The interface every runtime backend implements: compile an ONNX model, load it, run batches.

This module imports nothing heavier than numpy, so a device that has only numpy and its runtime
can load and profile artifacts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from edgekd.errors import ModelError, RecipeError
from edgekd.threads import usable_cores

if TYPE_CHECKING:
    from edgekd.quantize.calibration import CalibrationSet

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class Artifact:
    """A compiled model file for one backend at one precision, with what produced it."""

    path: Path
    backend: str
    precision: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.precision not in PRECISIONS:
            raise RecipeError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "backend": self.backend,
            "precision": self.precision,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Artifact:
        """Inverse of :meth:`to_dict` (e.g. when reading a finished stage's ``stage.json``)."""
        return cls(Path(data["path"]), data["backend"], data["precision"], dict(data.get("metadata", {})))


class Runner(Protocol):
    """A loaded model: ``run`` maps an input batch to an output batch (logits)."""

    info: dict[str, Any]  # threads, providers, runtime version, settings that affect speed

    def run(self, batch: np.ndarray) -> np.ndarray: ...


class Backend(ABC):
    """One runtime. Subclasses import their runtime inside methods, never at module level."""

    name: ClassVar[str]
    install: ClassVar[str]  # how to get the runtime, shown when it is missing
    precisions: ClassVar[tuple[str, ...]]
    # True when compile() builds INT8 itself from the float model (and then accepts ``budget``, an
    # AccuracyBudget); False when it compiles a QDQ model made by the quantize stage.
    quantizes_itself: ClassVar[bool] = False
    # Performance hints load() accepts as ``hint=`` (e.g. OpenVINO's latency/throughput); empty: none.
    hints: ClassVar[tuple[str, ...]] = ()
    # True when, without its runtime or device here, the compile stage still writes what the device
    # needs to build the artifacts itself (e.g. TensorRT: the ONNX files and build_engine.sh).
    builds_without_runtime: ClassVar[bool] = False

    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """``(True, "")`` when usable here, else ``(False, why)``."""

    @abstractmethod
    def compile(
        self, onnx_path: Path, out_dir: Path, precision: str, calib: CalibrationSet | None
    ) -> Artifact:
        """Build this backend's artifact of ``onnx_path`` at ``precision`` in ``out_dir``."""

    @abstractmethod
    def load(self, artifact: Artifact, threads: int | None = None) -> Runner:
        """Load ``artifact`` for inference with ``threads`` intra-op threads (default: all usable cores)."""

    def check_artifact(self, artifact: Artifact) -> None:
        """Refuse, in one line, an artifact of another backend or one whose file is gone."""
        if artifact.backend != self.name:
            raise RecipeError(
                f"artifact {artifact.path} was built for backend {artifact.backend!r}, not {self.name!r}"
            )
        if not artifact.path.is_file():
            raise ModelError(f"artifact {artifact.path} not found; run the compile stage again")

    def layer_times(
        self,
        artifact: Artifact,
        batch: np.ndarray,
        runs: int,
        warmup: int = 0,
        threads: int | None = None,
        **options: Any,
    ) -> dict[str, Any] | None:
        """Time per node over ``runs`` inferences of ``batch`` after ``warmup`` untimed ones, from the
        runtime's own profiler (:func:`edgekd.profile.layers.summarize_layers`); None where the runtime
        exposes no per-layer times. ``options`` are those of :meth:`load` (e.g. ``hint``)."""
        return None

    def check_precision(self, precision: str) -> None:
        """Raise a one-line RecipeError when this backend cannot build ``precision``."""
        if precision not in self.precisions:
            raise RecipeError(
                f"backend {self.name!r} supports precisions {', '.join(self.precisions)}, not {precision!r}; "
                f"change the target's precisions"
            )


def default_threads() -> int:
    """Cores this process may run on: its CPU affinity, capped by a container's CPU quota."""
    return usable_cores()


def resolve_threads(threads: int | None) -> int:
    """The profile's thread count: ``profile.threads`` exactly as the recipe asks, or every usable core
    when unset. Deliberately not shrunk when the machine is busy: latency is measured with a fixed,
    recorded count, and the profile stage warns instead when other processes loaded the machine
    (:func:`edgekd.threads.load_summary`). Training sizes its threads to the free cores
    (:func:`edgekd.threads.training_threads`)."""
    if threads is None:
        return default_threads()
    if threads < 1:
        raise RecipeError(f"profile.threads must be >= 1 (or unset for all cores), got {threads}")
    return threads
