"""The ``npz:FILE`` data source (issue 11): layouts, dtypes, groups, unlabelled data, bad files,
provenance.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgekd.data import build_dataset, raw_and_preprocess, require_labels
from edgekd.data.arrays import UINT8_SCALE
from edgekd.data.base import available_memory
from edgekd.errors import DataError
from edgekd.profile.accuracy import evaluate_logits
from edgekd.recipe import DataSpec
from edgekd.report.markdown import _per_snr
from edgekd.report.provenance import provenance_lines
from tests.test_bad_input import cli, one_error_line

RNG = np.random.default_rng(11)


def _sequences(n: int, classes: int = 3, length: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Float (n, 2, length) sequences whose class shows in their mean, and balanced labels."""
    y = np.arange(n) % classes
    x = RNG.normal(size=(n, 2, length)).astype(np.float32) + y[:, None, None].astype(np.float32)
    return x, y


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _build(path: Path, **spec: object) -> tuple:
    return build_dataset(DataSpec(name=f"npz:{path}", **spec), seed=0)


# --------------------------------------------------------------------------- layouts and dtypes


def test_x_y_layout_is_split_by_val_fraction_and_stratified(tmp_path: Path) -> None:
    x, y = _sequences(120)
    file = _save(tmp_path / "seq.npz", x=x, y=y)
    train, val, meta = _build(file, val_fraction=0.25)
    assert (len(train), len(val)) == (90, 30)
    assert np.bincount(val.y).tolist() == [10, 10, 10]  # every class held out in proportion
    assert train.x.dtype == np.float32 and train.x.shape[1:] == (2, 64) and train.y.dtype == np.int64
    assert meta.name == "npz" and meta.source == str(file) and meta.input_shape == (2, 64)
    assert meta.classes == ["0", "1", "2"] and meta.labelled and train.snr is None
    assert meta.normalisation["type"] == "none"
    # the split rows are the file's rows, unchanged
    rows = {row.tobytes() for row in x}
    assert all(row.tobytes() in rows for row in np.concatenate([train.x, val.x]))


def test_own_split_with_uint8_images_and_class_names(tmp_path: Path) -> None:
    x_train = RNG.integers(0, 256, (40, 1, 8, 8), dtype=np.uint8)
    x_val = RNG.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8)
    file = tmp_path / "img.npz"
    np.savez_compressed(  # compressed archives are read the same way (headers, then arrays)
        file,
        x_train=x_train,
        y_train=np.arange(40) % 4,
        x_val=x_val,
        y_val=np.arange(12) % 4,
        classes=np.array(["cat", "dog", "eel", "fox"]),
    )
    train, val, meta = _build(file)
    assert (len(train), len(val)) == (40, 12)  # the file's split is kept
    assert meta.classes == ["cat", "dog", "eel", "fox"] and meta.input_shape == (1, 8, 8)
    assert train.x.dtype == np.float32 and train.x.min() >= 0.0 and train.x.max() <= 1.0
    norm = meta.normalisation
    assert (
        norm["type"] == "scale" and norm["factor"] == pytest.approx(1 / 255) and norm["raw_dtype"] == "uint8"
    )
    # the val rows are the file's pixels times 1/255, in a seeded order
    expected = {(row.astype(np.float32) * np.float32(UINT8_SCALE)).tobytes() for row in x_val}
    assert {row.tobytes() for row in val.x} == expected
    # raw = what the user feeds the device (uint8); preprocess reproduces the model inputs exactly
    raw, preprocess = raw_and_preprocess(meta, val.x)
    assert raw.dtype == np.uint8 and {row.tobytes() for row in raw} == {row.tobytes() for row in x_val}
    assert np.array_equal(preprocess(raw), val.x)


def test_float_inputs_round_trip_unchanged(tmp_path: Path) -> None:
    x, y = _sequences(60)
    train, val, meta = _build(_save(tmp_path / "f.npz", x=x.astype(np.float64), y=y))
    assert meta.normalisation == {
        "type": "none",
        "description": "the file's float64 values as float32, no other preprocessing",
        "raw_dtype": "float64",
    }
    raw, preprocess = raw_and_preprocess(meta, val.x)
    assert raw is val.x and preprocess(raw).dtype == np.float32 and np.array_equal(preprocess(raw), val.x)


def test_rank_two_inputs_and_max_frames(tmp_path: Path) -> None:
    y = np.arange(200) % 2
    x = RNG.normal(size=(200, 5)).astype(np.float32)
    train, val, meta = _build(_save(tmp_path / "tab.npz", x=x, y=y), max_frames=80)
    assert len(train) + len(val) == 80 and meta.input_shape == (5,)
    assert np.bincount(np.concatenate([train.y, val.y])).tolist() == [40, 40]  # stratified cap


def test_fingerprint_follows_file_content_and_spec(tmp_path: Path) -> None:
    x, y = _sequences(60)
    file = _save(tmp_path / "a.npz", x=x, y=y)
    first = _build(file)[2].fingerprint
    assert _build(file)[2].fingerprint == first and len(first) == 64
    assert _build(file, max_frames=30)[2].fingerprint != first
    assert _build(file, val_fraction=0.5)[2].fingerprint != first
    x[0, 0, 0] += 1.0
    _save(file, x=x, y=y)
    assert _build(file)[2].fingerprint != first


# --------------------------------------------------------------------------- groups


def test_string_groups_become_codes_with_names_and_break_accuracy_down(tmp_path: Path) -> None:
    x, y = _sequences(90)
    groups = np.array(["indoor", "outdoor", "tunnel"] * 30)
    train, val, meta = _build(_save(tmp_path / "g.npz", x=x, y=y, groups=groups), val_fraction=1 / 3)
    assert meta.group_name == "group" and meta.group_labels == ["indoor", "outdoor", "tunnel"]
    assert val.snr.dtype == np.int64 and sorted(np.unique(val.snr).tolist()) == [0, 1, 2]
    assert np.bincount(val.snr).tolist() == [10, 10, 10]  # stratified by (class, group) too
    # logits right on every "indoor" sample and wrong on every other one
    logits = np.zeros((len(val), 3))
    truth = np.where(val.snr == 0, val.y, (val.y + 1) % 3)
    logits[np.arange(len(val)), truth] = 1.0
    result = evaluate_logits(logits, val.y, val.snr, group_labels=meta.group_labels)
    assert result["per_group"] == {"indoor": 1.0, "outdoor": 0.0, "tunnel": 0.0}
    assert result["per_group_n"] == {"indoor": 10, "outdoor": 10, "tunnel": 10}
    # the report table: heading from the meta, device rows (keyed by codes) mapped to the same names
    device = evaluate_logits(logits, val.y, val.snr)
    assert device["per_group"] == {"0": 1.0, "1": 0.0, "2": 0.0}
    report = {
        "data": meta.to_dict(),
        "rows": [
            {"name": "student (onnxruntime INT8)", "accuracy": result},
            {"name": "on dev", "accuracy": device},
        ],
    }
    lines = _per_snr(report)
    assert "## Accuracy per group" in lines
    assert "| model | indoor | outdoor | tunnel |" in lines
    assert "| on dev | 1.00 | 0.00 | 0.00 |" in lines


def test_integer_groups_keep_their_values_and_radio_reports_look_the_same(tmp_path: Path) -> None:
    x, y = _sequences(80)
    snr = np.array([-10, 0, 10, 20] * 20)
    file = _save(tmp_path / "s.npz", x_train=x[:60], y_train=y[:60], x_val=x[60:], y_val=y[60:])
    _save(
        file,
        x_train=x[:60],
        y_train=y[:60],
        x_val=x[60:],
        y_val=y[60:],
        groups_train=snr[:60],
        groups_val=snr[60:],
    )
    _, val, meta = _build(file)
    assert meta.group_labels is None and sorted(set(val.snr.tolist())) == [-10, 0, 10, 20]
    result = evaluate_logits(np.eye(3)[val.y], val.y, val.snr)
    assert list(result["per_group"]) == ["-10", "0", "10", "20"]
    # a radio report (meta without group_name, as before) keeps its heading
    radio = {"data": {}, "rows": [{"name": "teacher", "accuracy": result}]}
    assert _per_snr(radio)[1] == "## Accuracy per SNR (dB)"
    assert build_dataset(DataSpec(frames_per_class_snr=2), seed=0)[2].group_name == "SNR (dB)"


# --------------------------------------------------------------------------- unlabelled data


def test_unlabelled_data_builds_with_labels_minus_one(tmp_path: Path) -> None:
    x, _ = _sequences(40)
    train, val, meta = _build(_save(tmp_path / "u.npz", x=x))
    assert not meta.labelled and meta.classes == [] and len(train) + len(val) == 40
    assert set(train.y.tolist()) == {-1} and set(val.y.tolist()) == {-1}
    with pytest.raises(DataError, match=r"u\.npz: the data has no labels .* compress needs them"):
        require_labels(meta, "compress")
    named = _save(tmp_path / "v.npz", x_train=x[:30], x_val=x[30:], classes=np.array(["a", "b"]))
    train, val, meta = _build(named)
    assert not meta.labelled and meta.classes == ["a", "b"] and (len(train), len(val)) == (30, 10)
    require_labels(_build(_save(tmp_path / "l.npz", x=x, y=np.arange(40) % 2))[2], "compress")  # no error


# --------------------------------------------------------------------------- bad files, through the CLI


def _bad_files(tmp: Path) -> list[tuple[str, Path, tuple[str, ...]]]:
    x, y = _sequences(20)
    nan = x.copy()
    nan[3, 0, 5] = np.nan
    nan[7, 1, 0] = np.inf
    text = tmp / "notes.npz"
    text.write_text("not an archive\n")
    single = tmp / "single.npz"
    with open(single, "wb") as handle:
        np.save(handle, x)
    objects = tmp / "objects.npz"
    np.savez(objects, x=x, y=np.array([{"label": 1}] * 20, dtype=object))
    return [
        ("missing file", tmp / "absent.npz", ("absent.npz: not found", "npz:FILE")),
        ("not a zip", text, ("notes.npz: not an .npz archive (not a zip archive)", "x_train")),
        ("a .npy", single, ("single.npz: not an .npz archive (a single .npy array)",)),
        (
            "missing keys",
            _save(tmp / "half.npz", x_train=x, y_train=y),
            ("half.npz: missing key(s) x_val, y_val", "found: x_train, y_train", "expected keys"),
        ),
        ("unknown key", _save(tmp / "typo.npz", X=x, y=y), ("typo.npz: unknown key(s) X",)),
        (
            "mixed layouts",
            _save(tmp / "mixed.npz", x=x, y=y, x_train=x),
            ("mixed.npz: mixes the own-split keys",),
        ),
        (
            "lengths differ",
            _save(tmp / "short.npz", x=x, y=y[:19]),
            ("short.npz: key 'y' has shape (19,) but 'x' holds 20 samples",),
        ),
        (
            "group lengths differ",
            _save(tmp / "grp.npz", x=x, y=y, groups=np.arange(5)),
            ("grp.npz: key 'groups' has shape (5,)",),
        ),
        (
            "NaN/Inf",
            _save(tmp / "nan.npz", x=nan, y=y),
            ("nan.npz: key 'x' holds 2 NaN/Inf value(s), first in sample 3",),
        ),
        (
            "float labels",
            _save(tmp / "flt.npz", x=x, y=y.astype(np.float32)),
            ("flt.npz: key 'y' holds float32 values, labels must be integer",),
        ),
        (
            "negative label",
            _save(tmp / "neg.npz", x=x, y=np.where(np.arange(20) == 4, -1, y)),
            ("neg.npz: key 'y' holds negative label -1 (sample 4)",),
        ),
        (
            "label >= classes",
            _save(tmp / "range.npz", x=x, y=y, classes=np.array(["a", "b"])),
            ("range.npz: key 'classes' has 2 name(s) but the labels go up to 2",),
        ),
        (
            "classes not strings",
            _save(tmp / "cls.npz", x=x, y=y, classes=np.array([[0, 1, 2]])),
            ("cls.npz: key 'classes' has shape (1, 3)", "one string per class"),
        ),
        (
            "rank 1 inputs",
            _save(tmp / "flat.npz", x=x[:, 0, 0], y=y),
            ("flat.npz: key 'x' has shape (20,), need (N, ...) of rank >= 2",),
        ),
        (
            "train/val shapes differ",
            _save(tmp / "shape.npz", x_train=x, y_train=y, x_val=x[:, :, :32], y_val=y),
            ("shape.npz: x_train samples have shape (2, 64) but x_val samples (2, 32)",),
        ),
        (
            "uint8 train, float val",
            _save(tmp / "kinds.npz", x_train=x.astype(np.uint8), y_train=y, x_val=x, y_val=y),
            ("kinds.npz: x_train is uint8 but x_val is float32",),
        ),
        (
            "empty",
            _save(tmp / "empty.npz", x=np.zeros((0, 2, 8), np.float32), y=np.zeros(0, np.int64)),
            ("empty.npz: key 'x' is empty (shape (0, 2, 8))",),
        ),
        (
            "int16 inputs",
            _save(tmp / "i16.npz", x=x.astype(np.int16), y=y),
            ("i16.npz: key 'x' holds int16",),
        ),
        ("object array", objects, ("objects.npz: key 'y' holds Python objects",)),
    ]


def test_every_bad_file_is_one_cli_error_line_and_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    for case, file, fragments in _bad_files(tmp_path):
        args = ["compress", "--data", f"npz:{file}", "--until", "teacher", "--set", "teacher.train.epochs=1"]
        code, _, err = cli(monkeypatch, capsys, *args, "--set", f"runs_dir={runs}")
        line = one_error_line(code, err, *fragments)
        assert str(file) in line, (case, line)
    assert not runs.exists() or not any(runs.iterdir())  # nothing ran


def _header_only_npz(path: Path, shape: tuple[int, ...]) -> None:
    """An .npz whose x header claims ``shape`` float32 (the data itself is absent: never read)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue())  # the header writer writes the magic string too
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(shape[0], dtype=np.int8))  # y: small enough to be real
        archive.writestr("y.npy", buffer.getvalue())


def test_an_array_that_cannot_fit_fails_before_reading(tmp_path: Path) -> None:
    available = available_memory()
    if available is None:
        pytest.skip("available memory cannot be told here")
    rows = int(available // (2 * 1024 * 4)) + 1  # x alone, as stored, is larger than what is free
    file = tmp_path / "huge.npz"
    _header_only_npz(file, (rows, 2, 1024))
    with pytest.raises(DataError, match=r"huge\.npz: data\.path \(inputs x \(\d+, 2, 1024\).*GiB") as info:
        _build(file)
    assert "data.max_frames" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- provenance in the report


def test_provenance_lines_name_every_set() -> None:
    origin = {"dataset": "npz", "source": "my.npz", "fingerprint": "ab" * 32}
    data = {
        "name": "npz",
        "source": "my.npz",
        "fingerprint": "ab" * 32,
        "provenance": {
            "calibration": {**origin, "split": "train", "selection": "seeded random subset", "samples": 64},
            "accuracy_aware": None,
            "evaluation": {**origin, "split": "held-out (val)", "selection": "the first", "samples": 30},
            "eval_npz": {**origin, "split": "held-out (val)", "selection": "the first", "samples": 30},
            "train_samples": 90,
        },
    }
    (line,) = provenance_lines(data)
    assert line.startswith("- Data provenance — every set below is from npz `my.npz` (fingerprint `abababab")
    assert "INT8 calibration set: 64 samples (train; seeded random subset)" in line
    assert "bundle eval.npz: 30 samples (held-out (val); the first)" in line
    assert "accuracy-aware" not in line
    assert provenance_lines({"name": "x"}) == []  # reports from before provenance was recorded


# --------------------------------------------------------------------------- the pipeline on npz data


def test_compress_until_distill_on_npz_sequences(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    x, y = _sequences(96, classes=3, length=128)
    file = _save(tmp_path / "mine.npz", x=x, y=y, groups=np.array(["a", "b"] * 48))
    args = [
        "compress",
        "--data",
        f"npz:{file}",
        "--teacher",
        "edgekd:cnn",
        "--student",
        "edgekd:cnn",
        "--method",
        "kd",
        "--epochs",
        "1",
        "--until",
        "distill",
        "--set",
        f"runs_dir={tmp_path / 'runs'}",
    ]
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err + out
    run = tmp_path / "runs" / "mine"  # the run is named after the file
    teacher = json.loads((run / "01-teacher" / "stage.json").read_text())["outputs"]
    student = json.loads((run / "02-distill" / "stage.json").read_text())["outputs"]
    assert teacher["model"] == student["model"] == "edgekd:cnn" and student["method"] == "kd"
    assert len(teacher["history"]) == 1 and 0.0 <= teacher["val_accuracy"] <= 1.0
    assert 0.0 <= student["val_accuracy_last"] <= 1.0
    assert (run / student["model_file"]).is_file()
    assert sorted(path.name for path in run.iterdir() if path.is_dir()) == ["01-teacher", "02-distill"]


@pytest.mark.slow
def test_compress_to_report_on_npz_records_groups_and_provenance(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    x, y = _sequences(160, classes=3, length=128)
    groups = np.array(["near", "far"] * 80)
    file = _save(tmp_path / "mine.npz", x=x, y=y, groups=groups, classes=np.array(["p", "q", "r"]))
    settings = {
        "runs_dir": tmp_path / "runs",
        "profile.iterations": 5,
        "profile.warmup": 1,
        "quantize.calibration_samples": 32,
        "quantize.max_accuracy_drop": 0.05,
        "quantize.accuracy_samples": 40,
        "bundle.eval_samples": 20,
    }
    args = ["compress", "--data", f"npz:{file}", "--teacher", "edgekd:cnn", "--student", "edgekd:cnn"]
    args += ["--method", "kd", "--epochs", "1", "--target", "cpu"]
    args += [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err + out
    run = tmp_path / "runs" / "mine"
    report = json.loads((run / "report.json").read_text())
    data = report["data"]
    assert data["name"] == "npz" and data["source"] == str(file) and data["group_labels"] == ["far", "near"]
    provenance = data["provenance"]
    assert provenance["calibration"]["samples"] == 32 and provenance["calibration"]["split"] == "train"
    assert provenance["accuracy_aware"]["samples"] == 40
    assert provenance["evaluation"]["samples"] == 40 and provenance["eval_npz"]["samples"] == 20
    assert {entry["fingerprint"] for key, entry in provenance.items() if key != "train_samples"} == {
        data["fingerprint"]
    }
    for row in report["rows"]:
        assert list(row["accuracy"]["per_group"]) == ["far", "near"]
        assert row["accuracy"]["per_group_n"] == {"far": 20, "near": 20}
    markdown = (run / "report.md").read_text()
    assert "## Accuracy per group" in markdown and "| model | far | near |" in markdown
    assert f"- Data provenance — every set below is from npz `{file}`" in markdown
    with np.load(run / "bundle" / "x86-ort" / "eval.npz") as bundled:
        assert len(bundled["y"]) == 20 and set(bundled["groups"].tolist()) <= {0, 1}
