"""The ``user_script`` Microsoft Olive loads for benchmarks/vs_olive.py: our frames as its data, and accuracy.

Olive imports this file by path inside its own worker (with olive-ai on ``PYTHONPATH``). Frames come
from ``.npy`` files written by vs_olive.py; each data config names its files through
``load_dataset_config`` parameters. Olive's own accuracy metric (torchmetrics) scores the classes
``edgekd_argmax`` picks from the logits. Nothing here imports edgekd.
"""

from __future__ import annotations

import numpy as np
from olive.data.registry import Registry


class NpyFrames:
    """``({input_name: frame}, label)`` pairs from ``x_file`` (N, ...) and ``y_file`` (N,) (else labels 0).

    Inputs are dicts keyed by the model's input name: Olive's calibration reader accepts nothing else.
    """

    def __init__(self, x_file: str, y_file: str | None, input_name: str) -> None:
        self.x = np.load(x_file).astype(np.float32, copy=False)
        self.y = np.load(y_file).astype(np.int64) if y_file else np.zeros(len(self.x), dtype=np.int64)
        self.input_name = input_name

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[dict[str, np.ndarray], np.int64]:
        return {self.input_name: self.x[index]}, self.y[index]


@Registry.register_dataset()
def edgekd_npy_frames(x_file: str, input_name: str, y_file: str | None = None, **_: object) -> NpyFrames:
    """Olive dataset: our calibration or selection frames (registered under this function's name)."""
    return NpyFrames(x_file, y_file, input_name)


@Registry.register_post_process()
def edgekd_argmax(output, **_: object):
    """Olive post-process: logits (N, classes) to predicted classes, for its accuracy metric."""
    return output.argmax(dim=-1)
