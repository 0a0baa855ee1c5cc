"""The whole pipeline through the real CLI: report contents, caching, forced reruns, crash resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_cli import EDGEKD, run_cli

SMALL = [
    "--set", "data.frames_per_class_snr=6",
    "--set", "teacher.train.epochs=2",
    "--set", "distill.train.epochs=2",
    "--set", "quantize.calibration_samples=64",
    "--set", "profile.iterations=20",
    "--set", "profile.warmup=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    runs = tmp_path_factory.mktemp("runs")
    result = run_cli("compress", "--target", "cpu", "--name", "small", "--set", f"runs_dir={runs}", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return runs / "small", result


def test_report_has_every_row_with_real_numbers(small_run):
    run_dir, result = small_run
    report = json.loads((run_dir / "report.json").read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == [
        "teacher (PyTorch FP32)",
        "student (PyTorch FP32)",
        "student (onnxruntime FP32)",
        "student (onnxruntime INT8)",
    ]
    for row in report["rows"]:
        lat = row["latency"]
        assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
        assert lat["throughput_per_s"] > 0 and lat["threads"] >= 1 and lat["iterations"] == 20
        acc = row["accuracy"]
        assert 0 <= acc["accuracy"] <= 1 and acc["n"] == report["data"]["eval_frames"]
        assert len(acc["per_group"]) == 20  # one entry per SNR, -20..18 dB
        assert row["size_bytes"] > 0 and row["params"] > 0 and row["flops"] > 0
    teacher, student = report["rows"][0], report["rows"][1]
    assert teacher["params"] > student["params"]
    assert report["export"]["parity"]["max_abs_diff"] < 1e-4
    assert report["quantization"]["quantization"]["calibration"]["samples_used"] == 64
    fp32_onnx, int8_onnx = report["rows"][2], report["rows"][3]
    assert fp32_onnx["accuracy"]["accuracy"] == pytest.approx(student["accuracy"]["accuracy"], abs=0.01)
    assert fp32_onnx["accuracy"]["agreement"] >= 0.99  # the same network, up to float rounding
    assert 0 <= int8_onnx["accuracy"]["agreement"] <= 1
    assert report["headline"]["int8_agreement_with_pytorch"] == int8_onnx["accuracy"]["agreement"]
    assert student["accuracy"]["agreement"] is None
    assert set(report["stages"]) == {
        "teacher",
        "distill",
        "export",
        "quantize",
        "compile",
        "bundle",
        "profile",
        "remote",
    }
    markdown = (run_dir / "report.md").read_text()
    assert "Accuracy per SNR" in markdown and "student (onnxruntime INT8)" in markdown
    assert "- Augmentation: none (`distill.augment.enabled: false`)." in markdown
    assert "student (onnxruntime INT8)" in result.stdout  # the terminal summary table


def test_rerun_is_cached_and_force_reruns(small_run):
    run_dir, _ = small_run
    args = ["compress", "--target", "cpu", "--name", "small", "--set", f"runs_dir={run_dir.parent}", *SMALL]
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("cached") >= 7
    forced = run_cli(*args, "--force", "profile")
    assert forced.returncode == 0, forced.stderr
    assert "[profile] running" in forced.stdout and "[distill] cached" in forced.stdout


def test_changing_the_method_retrains_only_the_student(small_run):
    run_dir, _ = small_run
    args = ["compress", "--name", "small", "--set", f"runs_dir={run_dir.parent}", *SMALL, "--method", "kd"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "[teacher] cached" in result.stdout and "[distill] running" in result.stdout
    assert "teacher outputs reused from cache" in result.stdout


def test_augmentation_bank_and_semi_supervised_run_through_the_cli(small_run):
    """One teacher pass per (frame, variant) into a cache keyed by the bank; DHO with 30 % of the labels."""
    run_dir, _ = small_run
    runs = run_dir.parent
    teacher = run_dir / "01-teacher" / "teacher.pt"
    common = ["compress", "--until", "distill", "--set", f"runs_dir={runs}", *SMALL,
              "--set", f"teacher.checkpoint={teacher}"]  # fmt: skip
    aug = ["--set", "distill.augment.enabled=true", "--set", "distill.augment.variants=3", "--method", "kd"]
    first = run_cli(*common, "--name", "aug", *aug)
    assert first.returncode == 0, first.stderr
    record = json.loads((runs / "aug" / "02-distill" / "stage.json").read_text())["outputs"]
    assert record["augment"] == {
        "enabled": True,
        "variants": 3,
        "seed": 0,
        "policy": "default",
        "ops": ["carrier phase rotation U(0, 2π)", "circular time shift U{0..L-1} samples"],
        "as_in": "variant 0 is the frame itself",
    }
    assert record["teacher_cache"]["used"] and not record["teacher_cache"]["hit"]
    cache = runs.parent / "cache" / "teacher" / record["teacher_cache"]["key"]
    train_frames = round(11 * 20 * 6 * 0.75)
    assert np.load(cache / "logits.npy", mmap_mode="r").shape == (3, train_frames, 11)
    again = run_cli(*common, "--name", "aug-2", *aug[:-1], "skd")  # another method, the same bank
    assert "teacher outputs reused from cache" in again.stdout, again.stdout
    other_seed = run_cli(*common, "--name", "aug-3", *aug, "--set", "distill.augment.seed=5")
    assert "teacher outputs computed into cache" in other_seed.stdout, other_seed.stdout

    semi = run_cli(*common, "--name", "semi", "--method", "dho", "--set", "distill.label_fraction=0.3")
    assert semi.returncode == 0, semi.stderr
    record = json.loads((runs / "semi" / "02-distill" / "stage.json").read_text())["outputs"]
    assert record["label_fraction"] == 0.3 and 0 <= record["val_accuracy_last"] <= 1


def test_killed_distillation_resumes_from_its_checkpoint(tmp_path: Path):
    args = [*EDGEKD, "compress", "--until", "distill", "--name", "crash", "--set", f"runs_dir={tmp_path}",
            "--set", "data.frames_per_class_snr=2", "--set", "teacher.train.epochs=1",
            "--set", "distill.train.epochs=40"]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "crash" / "02-distill" / "latest.pt"
    deadline = time.monotonic() + 240
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "crash" / "02-distill" / "stage.json").exists()
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "[teacher] cached" in resumed.stdout
    assert "resuming from latest.pt after epoch" in resumed.stdout
    record = json.loads((tmp_path / "crash" / "02-distill" / "stage.json").read_text())
    assert record["outputs"]["resumed_from_epoch"] >= 1
    assert [row["epoch"] for row in record["outputs"]["history"]] == list(range(1, 41))


@pytest.mark.slow
def test_readme_main_job_default_recipe(tmp_path: Path):
    """The README's main job exactly as shipped (default recipe, target cpu), in a temporary runs dir."""
    started = time.monotonic()
    result = subprocess.run(
        [*EDGEKD, "compress", "--target", "cpu", "--set", f"runs_dir={tmp_path}"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "radio-default" / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    teacher = rows["teacher (PyTorch FP32)"]["accuracy"]["accuracy"]
    int8 = rows["student (onnxruntime INT8)"]["accuracy"]["accuracy"]
    assert teacher > 0.5 and int8 > 0.4  # 11 classes: chance is 0.09; low-SNR frames cap the mean
    assert report["headline"]["speedup_vs_teacher"] > 1
    print(f"default pipeline wall time: {elapsed:.0f} s", file=sys.stderr)


def test_deleted_artifact_is_rebuilt(small_run):
    run_dir, _ = small_run
    artifact = run_dir / "05-compile" / "student.int8.onnx"
    artifact.unlink()
    result = run_cli(
        "compress", "--name", "small", "--set", f"runs_dir={run_dir.parent}", *SMALL, "--method", "kd"
    )
    assert result.returncode == 0, result.stderr
    assert "[compile] running" in result.stdout and artifact.is_file()
