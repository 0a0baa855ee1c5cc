"""The teacher store: a teacher trained once is reused by later runs with the same settings and data."""

from __future__ import annotations

import json

import torch

from edgekd.api import compress
from edgekd.distill import teacher_store
from edgekd.recipe import load_recipe

TINY = [
    "teacher.checkpoint=null",  # trained here (not the shipped teacher): the store keeps what is trained
    "data.frames_per_class_snr=2",
    "data.snr_min=10",
    "teacher.train.epochs=1",
    "teacher.train.batch_size=64",
]


def _teacher(tmp_path, name: str, *sets: str, force: set[str] | None = None) -> tuple[dict, list[str]]:
    recipe = load_recipe(None, [f"runs_dir={tmp_path / 'runs'}", f"name={name}", *TINY, *sets])
    lines: list[str] = []
    outputs = compress(recipe, until="teacher", force=force, log=lines.append)["teacher"]
    return outputs, lines


def _state(tmp_path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(tmp_path / "runs" / name / "01-teacher" / "teacher.pt", weights_only=True)["state_dict"]


def test_a_second_run_reuses_the_stored_teacher(tmp_path):
    first, lines = _teacher(tmp_path, "one")
    assert first["origin"] == "trained here on labels"
    assert any("teacher kept in the store" in line for line in lines)
    second, lines = _teacher(tmp_path, "two", "distill.method=kd", "target=x86-openvino")
    assert second["origin"].startswith("teacher store ") and "by run one" in second["origin"]
    assert any("teacher reused from the store" in line for line in lines)
    assert second["history"] == first["history"] and second["val_accuracy"] == first["val_accuracy"]
    for key, value in _state(tmp_path, "one").items():
        assert torch.equal(value, _state(tmp_path, "two")[key])


def test_other_settings_or_store_off_or_force_train_afresh(tmp_path):
    _teacher(tmp_path, "one")
    other, _ = _teacher(tmp_path, "epochs", "teacher.train.epochs=2")  # another key
    assert other["origin"] == "trained here on labels"
    off, _ = _teacher(tmp_path, "store-off", "teacher.store=false")
    assert off["origin"] == "trained here on labels"
    forced, _ = _teacher(tmp_path, "one", force={"teacher"})
    assert forced["origin"] == "trained here on labels"


def test_a_damaged_entry_is_ignored_and_replaced(tmp_path):
    _teacher(tmp_path, "one")
    root = tmp_path / "cache" / "teachers"
    (entry_dir,) = [path for path in root.iterdir() if path.is_dir()]
    stored = entry_dir / teacher_store.MODEL_FILE
    data = bytearray(stored.read_bytes())
    data[-10] ^= 0xFF
    stored.write_bytes(bytes(data))
    again, _ = _teacher(tmp_path, "two")
    assert again["origin"] == "trained here on labels"  # the damaged entry was not used...
    entry = json.loads((entry_dir / teacher_store.ENTRY_FILE).read_text())
    assert teacher_store.find(root, entry_dir.name) is not None  # ...and was republished intact
    assert entry["run"] == "two"
