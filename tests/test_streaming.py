"""Streamed ImageFolder data (issue 14, "Data that does not fit in memory"): the same values, batches,
losses and weights as the in-memory path, reproducible with DataLoader workers; one-line mistakes."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from edgekd.data import DATASETS, FileArray, build_dataset, is_streamed
from edgekd.data.augment import augmentation_bank
from edgekd.data.streaming import index_batches, load_batches
from edgekd.data.vision import STREAM_MEMORY_SHARE, stream_images
from edgekd.distill.methods import ModelShape, build_method
from edgekd.distill.teacher_cache import compute_teacher_outputs
from edgekd.distill.trainer import predict_accuracy, train
from edgekd.errors import DataError, RecipeError
from edgekd.recipe import DataSpec, DistillSpec, TrainSpec
from tests.test_cli import assert_user_error, run_cli
from tests.test_openvino import needs_openvino

SIZE = 16  # data.image_size of these tests


class TinyCNN(nn.Module):
    """The trainer's model interface (forward_features, head, feature_dim) for (3, 16, 16) images."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.feature_dim = 8
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(8, 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 16 noisy PNG/JPEG images of 12x10 pixels (resized to 16x16 on reading)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog", "owl")):
        (root / name).mkdir()
        for i in range(16):
            pixels = rng.integers(0, 256, size=(10, 12, 3)) // 2 + 40 * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.{'png' if i % 3 else 'jpg'}")
    return root


def _spec(folder: Path, stream: bool, workers: int = 0) -> DataSpec:
    return DataSpec(name="imagefolder", path=folder, image_size=SIZE, stream=stream, workers=workers)


def test_lazy_x_indexes_like_the_eager_array(folder: Path) -> None:
    eager_train, eager_val, eager_meta = build_dataset(_spec(folder, False), seed=0)
    train_set, val_set, meta = build_dataset(_spec(folder, True), seed=0)
    assert meta.fingerprint == eager_meta.fingerprint and meta.input_shape == (3, SIZE, SIZE)
    for lazy, eager in ((train_set, eager_train), (val_set, eager_val)):
        x = lazy.x
        assert isinstance(x, FileArray) and is_streamed(x) and not is_streamed(eager.x)
        assert x.shape == eager.x.shape and x.dtype == np.float32 and len(x) == len(eager.x)
        np.testing.assert_array_equal(lazy.y, eager.y)
        np.testing.assert_array_equal(x[3], eager.x[3])
        np.testing.assert_array_equal(x[-1], eager.x[-1])
        np.testing.assert_array_equal(x[1:7:2], eager.x[1:7:2])
        np.testing.assert_array_equal(x[np.array([5, 0, 2, 5])], eager.x[np.array([5, 0, 2, 5])])
        mask = np.arange(len(x)) % 3 == 0
        np.testing.assert_array_equal(x[mask], eager.x[mask])
        np.testing.assert_array_equal(np.asarray(x), eager.x)
        assert x[np.array([], dtype=np.int64)].shape == (0, 3, SIZE, SIZE)
    picked = train_set.subset(np.array([4, 1]))
    assert isinstance(picked.x, FileArray) and len(picked.x) == 2
    np.testing.assert_array_equal(picked.x[:], eager_train.x[[4, 1]])
    with pytest.raises(IndexError):
        train_set.x[len(train_set)]


def _bank(train_set, meta):
    return augmentation_bank(meta, len(train_set), variants=3, seed=5)


def _train(folder: Path, stream: bool, workers: int, stage_dir: Path) -> tuple[nn.Module, list[dict]]:
    """Two epochs of KD from a live teacher with an augmentation bank; the student and its history."""
    train_set, val_set, meta = build_dataset(_spec(folder, stream, workers), seed=0)
    teacher, student = TinyCNN(seed=1).eval(), TinyCNN(seed=2)
    method = build_method(DistillSpec(method="kd"), 3, ModelShape(8), ModelShape(8))
    result = train(
        student,
        method,
        train_set,
        val_set,
        TrainSpec(epochs=2, batch_size=8, lr=1e-2, weight_decay=0.0),
        seed=3,
        stage_dir=stage_dir,
        fingerprint="fp",
        teacher=teacher,
        bank=_bank(train_set, meta),
        log=lambda _: None,
    )
    return student, result.history


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_training_matches_in_memory(folder: Path, tmp_path: Path, workers: int) -> None:
    eager, eager_history = _train(folder, False, 0, tmp_path / "eager")
    streamed, history = _train(folder, True, workers, tmp_path / "streamed")
    assert len(history) == 2
    for row, eager_row in zip(history, eager_history, strict=True):
        assert row["train_loss"] == pytest.approx(eager_row["train_loss"], abs=1e-5)
        assert row["val_accuracy"] == eager_row["val_accuracy"]
    for key, value in streamed.state_dict().items():
        torch.testing.assert_close(value, eager.state_dict()[key], atol=1e-6, rtol=1e-6)


def test_two_streamed_runs_with_workers_give_identical_weights(folder: Path, tmp_path: Path) -> None:
    first, first_history = _train(folder, True, 2, tmp_path / "a")
    second, second_history = _train(folder, True, 2, tmp_path / "b")
    assert first_history == second_history
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_streamed_batches_and_teacher_pass_equal_in_memory(folder: Path) -> None:
    eager, _, meta = build_dataset(_spec(folder, False), seed=0)
    lazy, _, _ = build_dataset(_spec(folder, True, workers=2), seed=0)
    batches = [np.array([7, 2, 30]), np.array([0]), np.array([11, 12, 13, 14])]
    got = list(load_batches(lazy.x, batches))
    assert [list(indices) for indices, _ in got] == [list(b) for b in batches]
    for (_, batch), indices in zip(got, batches, strict=True):
        assert torch.equal(batch, torch.from_numpy(eager.x[indices]))
    teacher = TinyCNN(seed=1)
    bank = _bank(eager, meta)
    streamed = compute_teacher_outputs(teacher, lazy.x, batch_size=8, bank=bank)
    in_memory = compute_teacher_outputs(teacher, eager.x, batch_size=8, bank=bank)
    assert streamed.logits.shape == (3, len(eager), 3) and streamed.features.shape == (3, len(eager), 8)
    np.testing.assert_array_equal(streamed.logits, in_memory.logits)
    np.testing.assert_array_equal(streamed.features, in_memory.features)
    assert predict_accuracy(teacher, lazy) == predict_accuracy(teacher, eager)
    assert [list(b) for b in index_batches(5, 2)] == [[0, 1], [2, 3], [4]]


def test_a_broken_file_in_a_worker_is_the_original_one_line_error(folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for file in sorted((folder / name).iterdir())[:4]:
            (root / name / file.name).write_bytes(file.read_bytes())
    (root / "dog" / "9.png").write_bytes(b"\x89PNG garbage")  # hashed at load, fails when decoded
    every, _ = DATASETS.get("imagefolder")(_spec(root, True, workers=2), 0)  # unsplit: all 9 images
    with pytest.raises(DataError, match=r"9\.png: cannot be read as an image") as caught:
        list(load_batches(every.x, index_batches(len(every), 4)))
    assert "\n" not in str(caught.value)


def test_auto_streams_only_above_the_memory_share(folder: Path) -> None:
    from edgekd.data.base import available_memory

    available = available_memory()
    assert available is not None
    fits = int(STREAM_MEMORY_SHARE * available / (3 * SIZE * SIZE * 4)) - 1
    auto = DataSpec(name="imagefolder", path=folder, image_size=SIZE)
    assert auto.stream == "auto" and auto.workers == 2
    assert not stream_images(auto, 100) and stream_images(auto, fits * 2)
    assert stream_images(_spec(folder, True), 1) and not stream_images(_spec(folder, False), 10**9)
    train_set, _, _ = build_dataset(auto, seed=0)  # a few images: in memory
    assert isinstance(train_set.x, np.ndarray)


def test_stream_true_on_a_source_that_cannot_stream_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot stream"):
        build_dataset(DataSpec(name="digits", stream=True), seed=0)
    result = run_cli(
        "compress", "--set", "data.stream=true", "--set", f"runs_dir={tmp_path / 'runs'}",
        "--until", "teacher",
    )  # fmt: skip
    assert_user_error(result, "data.stream=true", "radio-synthetic", "cannot stream", "data.stream: auto")


def test_workers_leave_the_sigchld_disposition_as_it_was(folder: Path, monkeypatch) -> None:
    """torch's SIGCHLD handler would run at every later child exit on an alternate signal stack that
    OpenVINO can leave unmapped (see the next test); torch installs it once per process, so that flag is
    reset here to see the first install whatever ran before."""
    from torch.utils.data._utils import signal_handling

    monkeypatch.setattr(signal_handling, "_SIGCHLD_handler_set", False)
    before = signal.getsignal(signal.SIGCHLD)
    lazy, _, _ = build_dataset(_spec(folder, True, workers=2), seed=0)
    assert len(list(load_batches(lazy.x, index_batches(len(lazy), 8)))) == len(index_batches(len(lazy), 8))
    assert signal.getsignal(signal.SIGCHLD) is before


# Two ov.Core released in the order they were made: OpenVINO's CPU plugin (SigAltStackSetup) then leaves
# the main thread's alternate signal stack on the first Core's unmapped one. A streamed pass with workers
# followed by a subprocess ended such a process in SIGSEGV (the whole test suite in one process did).
OPENVINO_THEN_STREAM = """
import subprocess, sys
import numpy as np, openvino as ov
from openvino import opset13 as ops
from edgekd.data import build_dataset
from edgekd.data.streaming import index_batches, load_batches
from edgekd.recipe import DataSpec

p = ops.parameter([1, 3], np.float32)
model = ov.Model([ops.relu(p)], [p])
first_core = ov.Core()
first = first_core.compile_model(model, "CPU")
second_core = ov.Core()
second = second_core.compile_model(model, "CPU")
del first, first_core
del second, second_core
spec = DataSpec(name="imagefolder", path=sys.argv[1], image_size=16, stream=True, workers=2)
train_set, _, _ = build_dataset(spec, seed=0)
batches = list(load_batches(train_set.x, index_batches(len(train_set), 8)))
for _ in range(3):
    subprocess.run([sys.executable, "-c", "pass"], check=True)
print("ok", len(batches))
"""


@needs_openvino
def test_child_exits_after_openvino_and_a_streamed_pass_do_not_crash(folder: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", OPENVINO_THEN_STREAM, str(folder)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.startswith("ok"), result.stdout
