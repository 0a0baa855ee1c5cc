"""The radio dataset layer: synthetic generator, RML2016.10a / RML2018.01a loaders, splits, errors."""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from edgekd.data import (
    DATASETS,
    MODULATIONS,
    RML2018_CLASSES,
    ArrayDataset,
    build_dataset,
    normalise_frames,
    synthesize,
)
from edgekd.data.base import stratified_split
from edgekd.data.radio import analytic, generate_synthetic, load_pickle, rrc_taps
from edgekd.errors import DataError, RecipeError
from edgekd.recipe import DataSpec

SMALL = DataSpec(frames_per_class_snr=4)


def _all(train: ArrayDataset, val: ArrayDataset) -> ArrayDataset:
    snr = np.concatenate([train.snr, val.snr]) if train.snr is not None else None
    return ArrayDataset(np.concatenate([train.x, val.x]), np.concatenate([train.y, val.y]), snr)


def _group_counts(data: ArrayDataset) -> dict[tuple[int, int], int]:
    pairs, counts = np.unique(np.stack([data.y, data.snr], axis=1), axis=0, return_counts=True)
    return {(int(c), int(s)): int(n) for (c, s), n in zip(pairs, counts, strict=True)}


def _power(x: np.ndarray) -> np.ndarray:
    return np.mean(np.sum(x.astype(np.float64) ** 2, axis=-2), axis=-1)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_dtypes_and_meta() -> None:
    train, val, meta = build_dataset(SMALL, seed=0)
    n = len(MODULATIONS) * 20 * 4
    assert len(train) + len(val) == n and len(val) == round(n * SMALL.val_fraction)
    for part in (train, val):
        assert part.x.dtype == np.float32 and part.x.shape[1:] == (2, 128)
        assert part.y.dtype == np.int64 and part.snr.dtype == np.int16
        assert np.isfinite(part.x).all()
        np.testing.assert_allclose(_power(part.x), 1.0, rtol=1e-4)
    assert meta.classes == list(MODULATIONS) and len(MODULATIONS) == 11
    assert meta.input_shape == (2, 128) and meta.task == "classification"
    assert meta.normalisation["type"] == "per-frame-rms"
    assert "seed 0" in meta.source
    assert json.loads(json.dumps(meta.to_dict()))["input_shape"] == [2, 128]


def test_synthetic_is_deterministic_per_seed() -> None:
    spec = DataSpec(frames_per_class_snr=2)
    (a_train, a_val, a_meta), (b_train, b_val, b_meta) = build_dataset(spec, 3), build_dataset(spec, 3)
    for a, b in ((a_train, b_train), (a_val, b_val)):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.snr, b.snr)
    assert a_meta.fingerprint == b_meta.fingerprint
    c_train, _, c_meta = build_dataset(spec, 4)
    assert not np.array_equal(np.sort(a_train.x, axis=None), np.sort(c_train.x, axis=None))
    assert c_meta.fingerprint != a_meta.fingerprint
    assert build_dataset(spec.model_copy(update={"snr_min": 0}), 3)[2].fingerprint != a_meta.fingerprint


def test_synthetic_classes_and_snrs_are_balanced_and_split_is_stratified() -> None:
    spec = DataSpec(frames_per_class_snr=8, snr_min=-6, snr_max=10)
    train, val, _ = build_dataset(spec, seed=1)
    snrs = list(range(-6, 11, 2))
    groups = [(c, s) for c in range(len(MODULATIONS)) for s in snrs]
    assert _group_counts(_all(train, val)) == dict.fromkeys(groups, 8)
    assert _group_counts(val) == dict.fromkeys(groups, 2)  # 8 * 0.25 held out of every pair
    assert _group_counts(train) == dict.fromkeys(groups, 6)
    assert len(set(train.y[:50].tolist())) > 5, "parts must be shuffled, not class-sorted"


def test_split_is_disjoint_and_proportional_with_uneven_groups() -> None:
    n = 103
    y = np.arange(n) % 3
    ids = np.arange(n, dtype=np.float32)[:, None, None] * np.ones((1, 2, 4), np.float32)
    data = ArrayDataset(ids, y, None)
    train, val = stratified_split(data, 0.3, seed=0, source="t")
    ids_train, ids_val = train.x[:, 0, 0].astype(int), val.x[:, 0, 0].astype(int)
    assert len(ids_val) == round(n * 0.3) and sorted([*ids_train, *ids_val]) == list(range(n))
    for c in range(3):
        assert abs(np.sum(val.y == c) - np.sum(y == c) * 0.3) < 1
    np.testing.assert_array_equal(y[ids_val], val.y)
    again = stratified_split(data, 0.3, seed=0, source="t")[1]
    np.testing.assert_array_equal(again.x, val.x)


def test_generated_snr_matches_the_requested_snr() -> None:
    rng = np.random.default_rng(0)
    for modulation in MODULATIONS:
        snr = np.repeat(np.array([-20, -4, 10, 18]), 30)
        frames = synthesize(modulation, snr, 128, rng)
        ratio = np.mean(np.abs(frames.signal) ** 2, 1) / np.mean(np.abs(frames.noise) ** 2, 1)
        measured = 10 * np.log10(ratio)
        for level in np.unique(snr):
            assert abs(measured[snr == level].mean() - level) < 0.5, (modulation, level)
        np.testing.assert_allclose(frames.received, frames.signal + frames.noise)


def test_snr_filter_and_frame_length() -> None:
    spec = DataSpec(frames_per_class_snr=2, snr_min=9, snr_max=14, frame_length=256)
    train, val, meta = build_dataset(spec, 0)
    assert set(np.concatenate([train.snr, val.snr]).tolist()) == {10, 12, 14}
    assert train.x.shape[1:] == (2, 256) and meta.input_shape == (2, 256)
    with pytest.raises(DataError, match="snr_min=19"):
        build_dataset(DataSpec(snr_min=19, snr_max=40), 0)


def test_default_generation_is_fast() -> None:
    start = time.perf_counter()
    data = generate_synthetic(DataSpec(), seed=0)
    assert len(data) == 11 * 20 * 40
    assert time.perf_counter() - start < 5.0


def test_normalise_frames_gives_unit_power_and_keeps_zero_frames() -> None:
    x = np.random.default_rng(0).normal(0, 0.01, (3, 2, 64)).astype(np.float32)
    x[1] = 0
    out = normalise_frames(x)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(_power(out)[[0, 2]], 1.0, rtol=1e-5)
    assert not out[1].any()
    np.testing.assert_allclose(normalise_frames(x[0]), out[0])  # one frame at inference


def test_signal_processing_helpers() -> None:
    taps = rrc_taps(0.35, 8, 8)
    assert len(taps) == 65 and np.isclose(np.sum(taps**2), 1.0) and np.argmax(taps) == 32
    phase = 2 * np.pi * 0.0625 * np.arange(256)  # a whole number of periods in the window
    np.testing.assert_allclose(analytic(np.cos(phase)), np.exp(1j * phase), atol=1e-9)


def _features(x: np.ndarray) -> np.ndarray:
    """Phase-invariant statistics of each frame: amplitude spread, cumulants, phase steps, spectral peaks."""
    z = x[:, 0] + 1j * x[:, 1]
    a = np.abs(z)
    c20, c21 = np.mean(z**2, 1), np.mean(a**2, 1)
    c40 = np.mean(z**4, 1) - 3 * c20**2
    c42 = np.mean(a**4, 1) - np.abs(c20) ** 2 - 2 * c21**2
    steps = np.angle(z[:, 1:] * np.conj(z[:, :-1]))
    peaks = [np.max(np.abs(np.fft.fft(z**k, axis=1)), 1) / z.shape[1] for k in (1, 2, 4)]
    return np.stack([a.std(1), np.abs(c20), np.abs(c40), c42, steps.std(1), np.abs(steps).mean(1), *peaks], 1)


def _softmax_regression_accuracy(train: ArrayDataset, val: ArrayDataset, n_classes: int) -> float:
    f_train, f_val = _features(train.x), _features(val.x)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-9
    f_train, f_val = (f_train - mean) / std, (f_val - mean) / std
    w, b, onehot = np.zeros((f_train.shape[1], n_classes)), np.zeros(n_classes), np.eye(n_classes)[train.y]
    for _ in range(400):
        logits = f_train @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        grad = (p / p.sum(1, keepdims=True) - onehot) / len(onehot)
        w, b = w - 0.5 * f_train.T @ grad, b - 0.5 * grad.sum(0)
    return float(np.mean((f_val @ w + b).argmax(1) == val.y))


def test_classes_are_learnable_at_high_snr_and_not_at_minus_20_db() -> None:
    n, chance = len(MODULATIONS), 1 / len(MODULATIONS)
    high = _softmax_regression_accuracy(*build_dataset(DataSpec(snr_min=10, snr_max=18), 0)[:2], n)
    low = _softmax_regression_accuracy(*build_dataset(DataSpec(snr_min=-20, snr_max=-20), 0)[:2], n)
    assert high > 5 * chance, high
    assert low < 2.5 * chance, low


# --------------------------------------------------------------------------- RML2016.10a


def _write_rml2016(
    path: Path, mods: tuple[str, ...] = ("QPSK", "BPSK", "WBFM"), snrs: tuple[int, ...] = (-2, 4)
) -> dict:
    """A tiny file with RML2016.10a's structure: pickle (protocol 2) of {(mod, snr): float32 (N, 2, 128)}."""
    rng = np.random.default_rng(7)
    table = {(m, s): rng.normal(0, 0.01, (6, 2, 128)).astype(np.float32) for m in mods for s in snrs}
    path.write_bytes(pickle.dumps(table, protocol=2))
    return table


def _lookup(table: dict) -> dict[bytes, tuple[str, int]]:
    return {normalise_frames(frame).tobytes(): key for key, frames in table.items() for frame in frames}


def test_rml2016_loads_frames_with_their_labels_and_snrs(tmp_path: Path) -> None:
    path = tmp_path / "RML2016.10a_dict.pkl"
    table = _write_rml2016(path)
    train, val, meta = build_dataset(DataSpec(name="rml2016.10a", path=path), seed=0)
    assert meta.name == "rml2016" and meta.classes == ["BPSK", "QPSK", "WBFM"]
    assert meta.input_shape == (2, 128)
    assert meta.source == str(path) and len(meta.fingerprint) == 64
    data = _all(train, val)
    assert len(data) == 36 and len(val) == 9
    lookup = _lookup(table)
    for frame, label, snr in zip(data.x, data.y, data.snr, strict=True):
        assert lookup[frame.tobytes()] == (meta.classes[label], snr)
    held_out = _group_counts(val)  # 6 frames per pair * 0.25 = 1.5: every pair gives 1 or 2
    assert len(held_out) == 6 and set(held_out.values()) == {1, 2}


def test_rml2016_snr_filter_max_frames_and_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "rml.pkl"
    _write_rml2016(path, snrs=(-10, 0, 10))
    spec = DataSpec(name="rml2016", path=path, snr_min=0, max_frames=18)
    train, val, meta = build_dataset(spec, seed=0)
    data = _all(train, val)
    assert set(data.snr.tolist()) == {0, 10} and len(data) == 18
    assert set(_group_counts(data).values()) == {3}  # 18 of 36 kept, evenly over 6 (class, SNR) pairs
    assert build_dataset(spec, seed=1)[2].fingerprint != meta.fingerprint
    _write_rml2016(path, mods=("QPSK", "BPSK", "AM-DSB"), snrs=(-10, 0, 10))
    assert build_dataset(spec, seed=0)[2].fingerprint != meta.fingerprint  # the file changed
    with pytest.raises(DataError, match=f"{path}.*no frames with SNR"):
        build_dataset(DataSpec(name="rml2016", path=path, snr_min=12), 0)


def _python2_pickle(table: dict[tuple[str, int], np.ndarray]) -> bytes:
    """Protocol 2 as Python 2's cPickle wrote RML2016.10a: byte strings (BINSTRING), numpy 1 module names."""

    def string(value: bytes) -> bytes:
        short = len(value) < 256
        return (b"U" + bytes([len(value)]) if short else b"T" + struct.pack("<i", len(value))) + value

    def integer(value: int) -> bytes:
        return b"J" + struct.pack("<i", value)

    out = b"\x80\x02}"
    for (mod, snr), frames in table.items():
        array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85"
        array += string(b"b") + b"\x87R"
        dtype = b"cnumpy\ndtype\n" + string(b"f4") + integer(0) + integer(1) + b"\x87R"
        dtype += b"(" + integer(3) + string(b"<") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb"
        shape = b"(" + b"".join(integer(d) for d in frames.shape) + b"t"
        state = b"(" + integer(1) + shape + dtype + b"\x89" + string(frames.astype("<f4").tobytes()) + b"tb"
        out += string(mod.encode()) + integer(snr) + b"\x86" + array + state + b"s"
    return out + b"."


def test_rml2016_reads_a_python2_pickle(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    keys = [(m, s) for m in ("8PSK", "AM-SSB") for s in (0, 6)]
    table = {key: rng.normal(0, 0.01, (4, 2, 128)).astype(np.float32) for key in keys}
    path = tmp_path / "py2.pkl"
    path.write_bytes(_python2_pickle(table))
    loaded = load_pickle(path)
    assert set(loaded) == set(table)
    for key, frames in table.items():
        np.testing.assert_array_equal(loaded[key], frames)
    train, val, meta = build_dataset(DataSpec(name="rml2016", path=path, val_fraction=0.5), seed=0)
    assert meta.classes == ["8PSK", "AM-SSB"] and len(train) == len(val) == 8


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):  # noqa: ANN204 - pickle protocol
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({("QPSK", 0): Exploit()}, protocol=2))
    with pytest.raises(DataError, match=r"evil\.pkl.*refusing to unpickle (posix|nt|os)\.system"):
        build_dataset(DataSpec(name="rml2016", path=path), 0)
    assert not marker.exists()
    fine = tmp_path / "fine.pkl"
    frames = np.ones((1, 2, 8), np.float32)
    for protocol in (2, 4, 5):  # numpy scalars and arrays are allowed, whatever the protocol
        fine.write_bytes(pickle.dumps({("QPSK", np.int64(2)): frames}, protocol=protocol))
        np.testing.assert_array_equal(load_pickle(fine)[("QPSK", 2)], frames)


def test_rml2016_missing_truncated_and_wrong_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs data.path"):
        build_dataset(DataSpec(name="rml2016"), 0)
    missing = tmp_path / "nowhere.pkl"
    with pytest.raises(DataError, match=f"{missing}: not found"):
        build_dataset(DataSpec(name="rml2016", path=missing), 0)
    full = tmp_path / "full.pkl"
    _write_rml2016(full)
    truncated = tmp_path / "half.pkl"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{truncated}: truncated or corrupt pickle"):
        build_dataset(DataSpec(name="rml2016", path=truncated), 0)
    wrong = {
        "list.pkl": [np.zeros((2, 2, 128), np.float32)],
        "key.pkl": {"QPSK": np.zeros((2, 2, 128), np.float32)},
        "shape.pkl": {("QPSK", 0): np.zeros((2, 128), np.float32)},
        "lengths.pkl": {("QPSK", 0): np.zeros((1, 2, 128), np.float32), ("BPSK", 0): np.zeros((1, 2, 64))},
    }
    for name, obj in wrong.items():
        (tmp_path / name).write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(DataError, match=f"{tmp_path / name}: .*RML2016.10a"):
            build_dataset(DataSpec(name="rml2016", path=tmp_path / name), 0)


# --------------------------------------------------------------------------- RML2018.01a


def _write_rml2018(path: Path, n: int = 96, n_classes: int = 24, length: int = 1024) -> dict[str, np.ndarray]:
    """A tiny file with RML2018.01a's structure: X (N, L, 2) float32, Y (N, C) one-hot, Z (N, 1) SNR."""
    rng = np.random.default_rng(3)
    labels = np.arange(n) % n_classes
    arrays = {
        "X": rng.normal(0, 0.02, (n, length, 2)).astype(np.float32),
        "Y": np.eye(n_classes, dtype=np.int64)[labels],
        "Z": np.where((np.arange(n) // n_classes) % 2 == 0, -8, 12).astype(np.int64)[:, None],
    }
    with h5py.File(path, "w") as handle:
        for name, value in arrays.items():
            handle.create_dataset(name, data=value)
    return arrays


def _check_rml2018_frames(data: ArrayDataset, arrays: dict[str, np.ndarray]) -> None:
    expected = normalise_frames(arrays["X"].transpose(0, 2, 1))
    lookup = {frame.tobytes(): i for i, frame in enumerate(expected)}
    for frame, label, snr in zip(data.x, data.y, data.snr, strict=True):
        row = lookup[frame.tobytes()]
        assert label == arrays["Y"][row].argmax() and snr == arrays["Z"][row, 0]


def test_rml2018_loads_and_transposes(tmp_path: Path) -> None:
    path = tmp_path / "GOLD_XYZ_OSC.0001_1024.hdf5"
    arrays = _write_rml2018(path)
    train, val, meta = build_dataset(DataSpec(name="rml2018.01a", path=path), seed=0)
    assert meta.name == "rml2018" and meta.classes == list(RML2018_CLASSES) and meta.input_shape == (2, 1024)
    data = _all(train, val)
    assert len(data) == 96 and data.x.dtype == np.float32 and data.snr.dtype == np.int16
    _check_rml2018_frames(data, arrays)


def test_rml2018_max_frames_snr_filter_and_other_class_counts(tmp_path: Path) -> None:
    path = tmp_path / "rml2018.h5"
    arrays = _write_rml2018(path, n=240, n_classes=5, length=32)
    train, val, meta = build_dataset(DataSpec(name="rml2018", path=path, snr_min=0, max_frames=40), seed=0)
    data = _all(train, val)
    assert meta.classes == [f"class{i}" for i in range(5)]
    assert len(data) == 40 and set(data.snr.tolist()) == {12}
    assert set(_group_counts(data).values()) == {8}
    _check_rml2018_frames(data, arrays)


def test_rml2018_truncated_and_wrong_files(tmp_path: Path) -> None:
    full = tmp_path / "full.h5"
    _write_rml2018(full)
    truncated = tmp_path / "half.h5"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{truncated}: truncated or unreadable HDF5"):
        build_dataset(DataSpec(name="rml2018", path=truncated), 0)
    not_hdf5 = tmp_path / "text.hdf5"
    not_hdf5.write_text("hello")
    with pytest.raises(DataError, match=f"{not_hdf5}: truncated or unreadable HDF5"):
        build_dataset(DataSpec(name="rml2018", path=not_hdf5), 0)
    no_z = tmp_path / "no_z.h5"
    with h5py.File(no_z, "w") as handle:
        handle["X"], handle["Y"] = np.zeros((4, 16, 2), np.float32), np.eye(4)
    with pytest.raises(DataError, match=f"{no_z}: missing dataset.*Z"):
        build_dataset(DataSpec(name="rml2018", path=no_z), 0)
    bad_shape = tmp_path / "shape.h5"
    with h5py.File(bad_shape, "w") as handle:
        handle["X"], handle["Y"], handle["Z"] = np.zeros((4, 2, 16), np.float32), np.eye(4), np.zeros((3, 1))
    with pytest.raises(DataError, match=f"{bad_shape}: shapes X"):
        build_dataset(DataSpec(name="rml2018", path=bad_shape), 0)
    with pytest.raises(DataError, match="needs data.path"):
        build_dataset(DataSpec(name="rml2018"), 0)


# --------------------------------------------------------------------------- registry


def test_unknown_dataset_name_suggests_a_close_one() -> None:
    with pytest.raises(RecipeError, match=r"unknown dataset 'rml2106'.*did you mean 'rml2016'") as info:
        build_dataset(DataSpec(name="rml2106"), 0)
    assert "radio-synthetic" in str(info.value)
    assert {"radio-synthetic", "rml2016", "rml2018"} <= set(DATASETS.names())
