"""Bad and hostile input (issue 10): one line `edgekd: error: ...`, exit code 2, nothing executed.

Each class of mistake is checked before any training: through the real entry point
(``edgekd.cli.main``, in this process or as a subprocess) or through the library function that
reads the input. "Nothing executed" is checked as: no run directory was created.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from edgekd.cli import main
from edgekd.data import build_dataset
from edgekd.data.base import MIN_FRAME_LENGTH, available_memory
from edgekd.data.vision import DIGITS_COUNT, image_memory
from edgekd.errors import DataError, ModelError
from edgekd.models import build_model
from edgekd.models.checkpoint import load_checkpoint, load_weights, save_checkpoint
from edgekd.recipe import MAX_RECIPE_BYTES, DataSpec
from tests.test_data_radio import _write_rml2016, _write_rml2018

EDGEKD = [sys.executable, "-c", "from edgekd.cli import main; main()"]
SMALL = ("--set", "data.frames_per_class_snr=2", "--epochs", "1")


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``edgekd ARGS`` through the console entry point in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["edgekd", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(code: int, err: str, *fragments: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("edgekd: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_user_error(monkeypatch, capsys, args: list[str], *fragments: str) -> str:
    code, _, err = cli(monkeypatch, capsys, *args)
    return one_error_line(code, err, *fragments)


# --------------------------------------------------------------------------- recipe files


BOMB_LEVELS = "\n".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)
)
BILLION_LAUGHS = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + BOMB_LEVELS


def _bomb_in_name() -> str:
    """The same bomb as one flow value of ``name``: [&a [...], &b [*a, ...], ..., &i [*h, ...]]."""
    levels = [line.split(": ", 1)[1] for line in BILLION_LAUGHS.splitlines()]
    return f"name: [{', '.join(levels)}]\n"


def _bomb_in_option() -> str:
    body = BILLION_LAUGHS.replace("\n", "\n      ")
    return f"distill:\n  options:\n    skd:\n      {body}\n"


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        pytest.param(_bomb_in_name(), ("refused", "aliases"), id="alias-bomb-in-name"),
        pytest.param(_bomb_in_option(), ("refused", "aliases"), id="alias-bomb-in-option"),
        pytest.param("name: &n [*n]\n", ("refused", "refers to itself"), id="recursive-alias"),
        pytest.param("name: " + "[" * 3000 + "]" * 3000 + "\n", ("refused", "nested"), id="deep-nesting"),
        pytest.param(b"name: caf\xe9\n", ("not UTF-8", "0xe9"), id="bad-utf8"),
        pytest.param("", ("is empty",), id="empty"),
        pytest.param("# nothing but a comment\n\n", ("is empty",), id="comment-only"),
        pytest.param("name: x\n" + "#" * MAX_RECIPE_BYTES, ("bytes", "limit"), id="oversized"),
    ],
)
def test_hostile_recipe_files_fail_fast_in_one_line(tmp_path, monkeypatch, capsys, content, fragments):
    recipe = tmp_path / "hostile.yaml"
    if isinstance(content, bytes):
        recipe.write_bytes(content)
    else:
        recipe.write_text(content, encoding="utf-8")
    start = time.perf_counter()
    line = assert_user_error(
        monkeypatch, capsys, ["compress", "--recipe", str(recipe), "--dry-run"], *fragments
    )
    assert str(recipe) in line
    assert time.perf_counter() - start < 10


def test_alias_bomb_does_not_hang_the_real_command(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_bomb_in_name(), encoding="utf-8")
    result = subprocess.run(
        [*EDGEKD, "compress", "--recipe", str(recipe), "--set", f"runs_dir={tmp_path}/runs"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    one_error_line(result.returncode, result.stderr, str(recipe), "refused")
    assert not (tmp_path / "runs").exists()


def test_recipe_directory_and_plain_aliases(tmp_path, monkeypatch, capsys):
    assert_user_error(monkeypatch, capsys, ["compress", "--recipe", str(tmp_path), "--dry-run"], "directory")
    recipe = tmp_path / "aliases.yaml"  # aliases within the bounds are ordinary YAML
    recipe.write_text("teacher: {train: &t {epochs: 2, batch_size: 16}}\ndistill: {train: *t}\n")
    code, out, err = cli(monkeypatch, capsys, "compress", "--recipe", str(recipe), "--dry-run")
    assert code == 0, err
    assert out.count("epochs: 2") == 2 and out.count("batch_size: 16") == 2
    merged = tmp_path / "merge.yaml"  # so are merge keys
    merged.write_text("teacher: {train: &b {epochs: 3, lr: 0.01}}\ndistill: {train: {<<: *b, epochs: 4}}\n")
    code, out, err = cli(monkeypatch, capsys, "compress", "--recipe", str(merged), "--dry-run")
    assert code == 0, err
    assert "epochs: 3" in out and "epochs: 4" in out and out.count("lr: 0.01") == 2


def test_override_values_are_bounded_too(monkeypatch, capsys):
    deep = "[" * 100 + "]" * 100
    assert_user_error(
        monkeypatch, capsys, ["compress", "--set", f"name={deep}", "--dry-run"], "--set name", "nested"
    )


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--name", ".."], ("'name'", "'..'", "not start with '.'")),
        (["--name", "."], ("'name'", "'.'")),
        (["--name", ".hidden"], ("'name'", "'.hidden'")),
        (["--set", "name=a/b"], ("'name'", "'a/b'")),
        (["--seed", "-1"], ("'seed'", "-1")),
        (["--seed", str(2**32)], ("'seed'", str(2**32), "4294967295")),
        (["--set", "distill.augment.seed=-5"], ("distill.augment.seed",)),
    ],
)
def test_run_names_and_seeds_are_bounded(monkeypatch, capsys, args, fragments):
    assert_user_error(monkeypatch, capsys, ["compress", *args, "--dry-run"], *fragments)


def test_good_name_and_largest_seed_pass(monkeypatch, capsys):
    code, out, err = cli(
        monkeypatch, capsys, "compress", "--name", "run-1.b_2", "--seed", str(2**32 - 1), "--dry-run"
    )
    assert code == 0, err
    assert "name: run-1.b_2" in out and f"seed: {2**32 - 1}" in out


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["compress", "--epochs", "abc"], ("edgekd compress", "--epochs", "--help")),
        (["compress", "--epoch", "3"], ("No such option: --epoch",)),
        (["compresss"], ("No such command",)),
        (["bundle"], ("Missing argument",)),
        (["benchmark"], ("--targets",)),
    ],
)
def test_usage_errors_are_one_line(monkeypatch, capsys, args, fragments):
    code, out, err = cli(monkeypatch, capsys, *args)
    one_error_line(code, err, *fragments)
    assert "Usage:" not in out + err


def test_usage_error_from_the_installed_command():
    result = subprocess.run(
        [*EDGEKD, "compress", "--epochs", "abc"], capture_output=True, text=True, timeout=120
    )
    one_error_line(result.returncode, result.stderr, "--epochs")
    help_result = subprocess.run([*EDGEKD, "compress", "--help"], capture_output=True, text=True, timeout=120)
    assert help_result.returncode == 0 and "--epochs" in help_result.stdout


# --------------------------------------------------------------------------- checked before training


def _student_checkpoint(path: Path, classes: int) -> Path:
    save_checkpoint(path, build_model("edgekd:kd-cnn", num_classes=classes), "edgekd:kd-cnn")
    return path


@pytest.mark.parametrize(
    ("setting", "fragments"),
    [
        (
            "student.checkpoint={tmp}/missing.pt",
            ("student.checkpoint: checkpoint {tmp}/missing.pt", "not found"),
        ),
        ("student.checkpoint={tmp}", ("student.checkpoint", "{tmp} is a directory")),
        (
            "teacher.checkpoint={tmp}/missing.pt",
            ("teacher.checkpoint: checkpoint {tmp}/missing.pt", "not found"),
        ),
        (
            "student.checkpoint={tmp}/five.pt",
            ("student.checkpoint", "{tmp}/five.pt", "does not fit", "5 classes"),
        ),
        ("device.host=pi@@host:22", ("device", "pi@@host:22", "user@host[:port]")),
        ("device.host=pi@host:70000", ("port 70000",)),
        ("device.known_hosts={tmp}/no_known_hosts", ("device.known_hosts", "not found")),
        (
            "quantize.calibration_samples=4",
            ("quantize.calibration_samples = 4", "min_calibration_samples = 16"),
        ),
        # 2 frames per (class, SNR): 440 frames, 330 in train
        (
            "quantize.min_calibration_samples=400",
            ("train split has 330 frames", "min_calibration_samples = 400"),
        ),
        ("data.frame_length=100000000", ("data.frame_length=100000000", "memory", "available")),
        ("data.path={tmp}/nothing.pkl", ("{tmp}/nothing.pkl",)),
    ],
)
def test_checked_before_anything_runs(tmp_path, monkeypatch, capsys, setting, fragments):
    _student_checkpoint(tmp_path / "five.pt", classes=5)
    runs = tmp_path / "runs"
    args = ["compress", *SMALL, "--set", f"runs_dir={runs}", "--set", setting.format(tmp=tmp_path)]
    if "known_hosts" in setting:
        args += ["--device", "pi@localhost"]
    if "data.path" in setting:
        args += ["--data", "rml2016"]
    start = time.perf_counter()
    assert_user_error(monkeypatch, capsys, args, *(fragment.format(tmp=tmp_path) for fragment in fragments))
    assert not runs.exists(), "preflight must fail before the run directory is made"
    assert time.perf_counter() - start < 60


def test_short_frames_in_a_file_name_the_file_and_length(tmp_path, monkeypatch, capsys):
    path = tmp_path / "short.pkl"
    table = {(m, s): np.ones((6, 2, 4), np.float32) for m in ("BPSK", "QPSK") for s in (0, 10)}
    path.write_bytes(pickle.dumps(table, protocol=2))
    runs = tmp_path / "runs"
    args = ["compress", "--data", "rml2016", "--data-path", str(path), "--set", f"runs_dir={runs}"]
    assert_user_error(monkeypatch, capsys, args, str(path), "4 samples", str(MIN_FRAME_LENGTH))
    assert not runs.exists()


def test_preflight_builds_the_dataset_into_the_run_context():
    from edgekd.api import preflight
    from edgekd.pipeline import RunContext
    from edgekd.recipe import load_recipe

    recipe = load_recipe(None, ["data.frames_per_class_snr=2", "runs_dir=/nonexistent/never"])
    ctx = RunContext(recipe=recipe, run_dir=recipe.run_dir)
    assert preflight(recipe, ctx) is ctx and "dataset" in ctx.__dict__  # the run reuses what it built
    train, val, meta = ctx.dataset
    assert len(meta.classes) == 11 and len(train) + len(val) == 11 * 20 * 2
    assert not Path("/nonexistent/never").exists()


# --------------------------------------------------------------------------- data files


def _rml2016(path: Path, table: dict) -> DataSpec:
    path.write_bytes(pickle.dumps(table, protocol=2))
    return DataSpec(name="rml2016", path=path)


def test_rml2016_object_arrays_non_finite_values_and_one_class(tmp_path):
    objects = {("BPSK", 0): np.full((4, 2, 128), None, dtype=object), ("QPSK", 0): np.zeros((4, 2, 128))}
    with pytest.raises(DataError, match=r"entry \('BPSK', 0\) holds object values") as info:
        build_dataset(_rml2016(tmp_path / "objects.pkl", objects), seed=0)
    assert str(tmp_path / "objects.pkl") in str(info.value)

    table = _write_rml2016(tmp_path / "nan.pkl")
    table[("QPSK", 4)][2, 1, 7] = np.nan
    table[("QPSK", 4)][3, 0, 0] = np.inf
    with pytest.raises(DataError, match=r"entry \('QPSK', 4\) holds 2 non-finite value"):
        build_dataset(_rml2016(tmp_path / "nan.pkl", table), seed=0)

    with pytest.raises(DataError, match="1 class .BPSK., a classifier needs at least 2") as info:
        build_dataset(_rml2016(tmp_path / "one.pkl", {("BPSK", s): np.ones((8, 2, 128)) for s in (0, 2)}), 0)
    assert str(tmp_path / "one.pkl") in str(info.value)

    two = {(m, s): np.ones((8, 2, 128), np.float32) for m in ("BPSK", "QPSK") for s in (0, 10)}
    two[("QPSK", 0)] = two[("QPSK", 0)] * 2
    spec = _rml2016(tmp_path / "two.pkl", two).model_copy(update={"snr_min": 10})
    train, val, meta = build_dataset(spec, seed=0)  # two classes at 10 dB: fine
    assert meta.classes == ["BPSK", "QPSK"] and set(train.y) | set(val.y) == {0, 1}
    bpsk_only = _rml2016(
        tmp_path / "bpsk10.pkl", {("BPSK", 10): np.ones((8, 2, 128)), ("QPSK", 0): two[("QPSK", 0)]}
    )
    with pytest.raises(DataError, match="1 class"):  # the SNR filter leaves one class
        build_dataset(bpsk_only.model_copy(update={"snr_min": 10}), seed=0)


def test_rml2018_non_finite_x_or_z_and_one_class(tmp_path):
    path = tmp_path / "x.hdf5"
    _write_rml2018(path, n=48, length=64)
    with h5py.File(path, "r+") as handle:
        handle["X"][5, 3, 1] = np.nan
    with pytest.raises(DataError, match="dataset X holds 1 non-finite") as info:
        build_dataset(DataSpec(name="rml2018", path=path), seed=0)
    assert str(path) in str(info.value)

    path = tmp_path / "z.hdf5"
    arrays = _write_rml2018(path, n=48, length=64)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("X", data=arrays["X"])
        handle.create_dataset("Y", data=arrays["Y"])
        handle.create_dataset("Z", data=np.where(np.arange(48) == 9, np.nan, 4.0)[:, None])
    with pytest.raises(DataError, match=r"dataset Z \(SNR\) holds 1 non-finite"):
        build_dataset(DataSpec(name="rml2018", path=path), seed=0)

    path = tmp_path / "one.hdf5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("X", data=arrays["X"])
        handle.create_dataset("Y", data=np.eye(24, dtype=np.int64)[np.zeros(48, dtype=np.int64)])
        handle.create_dataset("Z", data=arrays["Z"])
    with pytest.raises(DataError, match="1 class .OOK."):
        build_dataset(DataSpec(name="rml2018", path=path), seed=0)

    path = tmp_path / "short.hdf5"
    _write_rml2018(path, n=48, length=MIN_FRAME_LENGTH - 1)
    with pytest.raises(DataError, match=f"frames are {MIN_FRAME_LENGTH - 1} samples long"):
        build_dataset(DataSpec(name="rml2018", path=path), seed=0)


def test_sizes_that_cannot_fit_in_memory_name_the_field():
    with pytest.raises(DataError, match="data.frame_length=100000000") as info:
        build_dataset(DataSpec(frame_length=100_000_000), seed=0)
    assert "\n" not in str(info.value) and "GiB" in str(info.value)
    available = available_memory()
    if available is None or available > image_memory(DIGITS_COUNT, 1024):
        pytest.skip("this machine could hold digits at 1024x1024")
    with pytest.raises(DataError, match="data.image_size=1024"):
        build_dataset(DataSpec(name="digits", image_size=1024), seed=0)


# --------------------------------------------------------------------------- checkpoints


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_line_model_error(path: Path, fragment: str, load=load_checkpoint) -> str:
    with pytest.raises(ModelError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and fragment in message, message
    return message


def test_bad_checkpoints_are_one_line_naming_the_file(tmp_path, capfd):
    _one_line_model_error(tmp_path / "missing.pt", "not found")
    _one_line_model_error(tmp_path, "is a directory")

    marker = tmp_path / "pwned"
    for protocol in (2, 4):
        evil = tmp_path / f"evil{protocol}.pt"
        evil.write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=protocol))
        _one_line_model_error(evil, "refused")
    assert not marker.exists(), "a code payload was executed"
    assert capfd.readouterr().err == ""  # no multi-line warning from torch either

    model = build_model("edgekd:kd-cnn", num_classes=11)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    odd = tmp_path / "odd.pt"
    torch.save(
        {"model": "edgekd:kd-cnn", "num_classes": 11, "in_channels": 2, "state_dict": {**state, "x": 1}}, odd
    )
    _one_line_model_error(odd, "'x' holds a int, not a tensor")

    def load(path: Path) -> None:
        load_weights(build_model("edgekd:kd-cnn", num_classes=11), path, "edgekd:kd-cnn")

    plain = tmp_path / "plain.pt"
    torch.save({**state, "head.weight": state["head.weight"][:5]}, plain)
    _one_line_model_error(plain, "does not fit", load)
    good = tmp_path / "good.pt"
    torch.save(state, good)
    load(good)
