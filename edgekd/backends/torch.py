"""The PyTorch reference: runs an ``nn.Module`` (teacher or student) on the CPU like a backend runner.

It builds no artifact: :class:`TorchRunner` is used directly so that PyTorch accuracy and latency
are measured by the same profiler as the compiled artifacts. torch is imported lazily.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.backends import BACKENDS
from edgekd.backends.base import Artifact, Backend, resolve_threads
from edgekd.errors import ModelError, RecipeError

if TYPE_CHECKING:
    from torch import nn

    from edgekd.quantize.calibration import CalibrationSet

_NO_ARTIFACTS = (
    "backend 'torch' is the PyTorch reference and builds no artifact; run a module with "
    "edgekd.backends.torch.TorchRunner(model), or choose backend 'onnxruntime' for a deployable model"
)


class TorchRunner:
    """Runs ``model`` in eval mode on the CPU under ``torch.inference_mode`` with ``threads`` threads.

    The module is moved to the CPU and set to eval mode in place. ``torch.set_num_threads`` is
    process-wide; it is re-applied before each batch in case other code changed it.
    """

    def __init__(self, model: nn.Module, threads: int | None = None) -> None:
        import torch

        self._torch = torch
        self.model = model.cpu().eval()
        self.threads = resolve_threads(threads)
        torch.set_num_threads(self.threads)
        self.info: dict[str, Any] = {
            "backend": "torch",
            "model_class": type(model).__name__,
            "precision": "fp32",
            "threads": self.threads,
            "device": "cpu",
            "version": torch.__version__,
        }

    def _input(self, batch: np.ndarray) -> Any:
        """``batch`` as a float32 CPU tensor, with this runner's thread count re-applied."""
        torch = self._torch
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        array = np.ascontiguousarray(batch, dtype=np.float32)
        if not array.flags.writeable:  # torch.from_numpy warns on read-only arrays (e.g. memory maps)
            array = array.copy()
        return torch.from_numpy(array)

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        tensor = self._input(batch)
        with torch.inference_mode():
            output = self.model(tensor)
        if not isinstance(output, torch.Tensor):
            raise ModelError(
                f"{self.info['model_class']} returned {type(output).__name__}, expected a logits tensor"
            )
        return output.numpy()


@BACKENDS.register("torch", aliases=("pytorch",))
class TorchBackend(Backend):
    """Availability of PyTorch; compile/load are not meaningful (use :class:`TorchRunner`)."""

    name = "torch"
    install = "pip install torch"
    precisions = ("fp32",)

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("torch") is None:
            return False, "torch is not installed"
        return True, ""

    def compile(
        self, onnx_path: Path, out_dir: Path, precision: str, calib: CalibrationSet | None
    ) -> Artifact:
        raise RecipeError(_NO_ARTIFACTS)

    def load(self, artifact: Artifact, threads: int | None = None) -> TorchRunner:
        raise RecipeError(_NO_ARTIFACTS)
