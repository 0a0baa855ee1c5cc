"""Latency statistics and protocol, accuracy per group, confusion matrix, device-side imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgekd.errors import DataError, ModelError, RecipeError
from edgekd.profile import evaluate_classifier, measure_latency, peak_rss_mb


class TableRunner:
    """Hand-made runner: sample i (its value x[i, 0]) gets the fixed logits row i of a table."""

    def __init__(self, logits: np.ndarray, threads: int = 3) -> None:
        self.logits = logits
        self.info = {"backend": "table", "threads": threads}
        self.calls = 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.logits[batch[:, 0].astype(int)]


def one_hot_logits(predicted: list[int], classes: int) -> np.ndarray:
    logits = np.zeros((len(predicted), classes), dtype=np.float32)
    logits[np.arange(len(predicted)), predicted] = 1.0
    return logits


def test_latency_statistics_and_protocol() -> None:
    runner = TableRunner(np.zeros((4, 3), dtype=np.float32))
    sample = np.arange(4, dtype=np.float32)[:, None]
    result = measure_latency(runner, sample, warmup=3, iterations=50)
    assert runner.calls == 53
    assert (
        0 < result["min_ms"] <= result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"] <= result["max_ms"]
    )
    assert result["std_ms"] >= 0
    assert result["throughput_per_s"] == pytest.approx(4 / (result["mean_ms"] / 1e3))
    assert result["end_to_end"] is None
    assert result["warmup"] == 3 and result["iterations"] == 50 and result["batch"] == 4
    assert result["threads"] == 3 and result["clock"] == "perf_counter"
    assert "linear" in result["percentile_method"] and result["gc_disabled_while_timing"]


def test_end_to_end_latency_includes_pre_and_postprocessing() -> None:
    runner = TableRunner(np.zeros((2, 3), dtype=np.float32))
    calls = {"pre": 0, "post": 0}

    def preprocess(raw: np.ndarray) -> np.ndarray:
        calls["pre"] += 1
        return (raw[:, :1] > 0).astype(np.float32)

    def postprocess(logits: np.ndarray) -> np.ndarray:
        calls["post"] += 1
        return logits.argmax(1)

    raw = np.ones((2, 5), dtype=np.float32)
    result = measure_latency(
        runner, raw, warmup=2, iterations=20, preprocess=preprocess, postprocess=postprocess
    )
    assert calls == {"pre": 1 + 22, "post": 22} and runner.calls == 44
    e2e = result["end_to_end"]
    assert e2e["p50_ms"] <= e2e["p90_ms"] <= e2e["p99_ms"]
    assert result["end_to_end_includes"] == ["preprocess", "run", "postprocess"]
    assert result["batch"] == 2


def test_latency_mistakes() -> None:
    runner = TableRunner(np.zeros((1, 2), dtype=np.float32))
    sample = np.zeros((1, 1), dtype=np.float32)
    with pytest.raises(RecipeError, match="profile.iterations"):
        measure_latency(runner, sample, warmup=0, iterations=0)
    with pytest.raises(RecipeError, match="profile.warmup"):
        measure_latency(runner, sample, warmup=-1, iterations=5)
    with pytest.raises(DataError, match="B >= 1"):
        measure_latency(runner, np.zeros((0, 1), dtype=np.float32), warmup=0, iterations=5)


def test_accuracy_per_group_and_confusion() -> None:
    predicted = [0, 1, 2, 2, 1, 0, 0, 2]
    labels = np.array([0, 1, 2, 1, 1, 2, 0, 2])
    snr = np.array([10, 10, -20, -20, 0, 0, -2, -2])
    runner = TableRunner(one_hot_logits(predicted, classes=3))
    x = np.arange(8, dtype=np.float32)[:, None]
    result = evaluate_classifier(runner, x, labels, batch_size=3, groups=snr)
    assert runner.calls == 3
    assert result["n"] == 8 and result["accuracy"] == pytest.approx(6 / 8)
    assert list(result["per_group"]) == ["-20", "-2", "0", "10"]
    assert result["per_group"] == {"-20": 0.5, "-2": 1.0, "0": 0.5, "10": 1.0}
    assert result["per_group_n"] == {"-20": 2, "-2": 2, "0": 2, "10": 2}
    confusion = np.array(result["confusion"])
    assert confusion.sum() == 8 and np.trace(confusion) == 6
    assert confusion[1, 2] == 1 and confusion[2, 0] == 1


def test_accuracy_without_groups_and_labels_beyond_logits() -> None:
    runner = TableRunner(one_hot_logits([0, 1], classes=2))
    result = evaluate_classifier(runner, np.array([[0.0], [1.0]]), np.array([0, 3]), batch_size=8)
    assert result["per_group"] is None and result["accuracy"] == 0.5
    assert np.array(result["confusion"]).shape == (4, 4)


def test_evaluation_mistakes() -> None:
    runner = TableRunner(one_hot_logits([0, 1], classes=2))
    x = np.array([[0.0], [1.0]])
    with pytest.raises(DataError, match="2 inputs but 3 labels"):
        evaluate_classifier(runner, x, np.array([0, 1, 1]), batch_size=2)
    with pytest.raises(DataError, match="group values"):
        evaluate_classifier(runner, x, np.array([0, 1]), batch_size=2, groups=np.array([1]))
    with pytest.raises(DataError, match="empty"):
        evaluate_classifier(runner, x[:0], np.array([], dtype=int), batch_size=2)

    class Flat(TableRunner):
        def run(self, batch: np.ndarray) -> np.ndarray:
            return np.zeros(len(batch))

    with pytest.raises(ModelError, match="expected logits shaped"):
        evaluate_classifier(Flat(np.zeros(1)), x, np.array([0, 1]), batch_size=2)


def test_peak_rss() -> None:
    peak = peak_rss_mb()
    assert peak is not None and 1 < peak < 1e6


def test_device_side_code_needs_no_torch_or_onnx() -> None:
    code = (
        "import sys, edgekd.profile, edgekd.backends.onnxruntime; "
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_agreement_with_a_reference_model() -> None:
    """Share of samples on which a runner predicts the same class as a reference model."""

    class Fixed:
        info = {"backend": "fixed"}

        def run(self, batch):
            return np.eye(3, dtype=np.float32)[np.arange(len(batch)) % 3]

    x = np.zeros((6, 2), np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    reference = np.array([0, 1, 2, 1, 1, 1])  # agrees on samples 0, 1, 2, 4
    result = evaluate_classifier(Fixed(), x, y, batch_size=6, reference=reference)
    assert result["accuracy"] == 1.0 and result["agreement"] == pytest.approx(4 / 6)
    assert evaluate_classifier(Fixed(), x, y, batch_size=6)["agreement"] is None


def test_profile_warns_when_a_busy_process_competes(tmp_path) -> None:
    """A real spin loop runs beside a tiny pipeline: training takes fewer threads, while the profile
    keeps every core it was asked for and warns in the log, report.json and report.md."""
    import json
    import os
    import re

    from edgekd.threads import usable_cores
    from tests.test_cli import EDGEKD
    from tests.test_threads import spinner

    # let edgekd choose (this test process's own `import edgekd` set OMP_WAIT_POLICY: drop it too)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    process = spinner(seconds=280)
    try:
        # fmt: off
        args = [
            "compress", "--target", "cpu", "--name", "busy", "--set", f"runs_dir={tmp_path}",
            "--set", "data.frames_per_class_snr=2", "--set", "teacher.train.epochs=1",
            "--set", "distill.train.epochs=1", "--set", "quantize.calibration_samples=32",
            "--set", "profile.iterations=10", "--set", "profile.warmup=1",
        ]
        # fmt: on
        result = subprocess.run([*EDGEKD, *args], capture_output=True, text=True, env=env, timeout=280)
    finally:
        process.kill()
        process.wait()
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    cores = usable_cores()
    chosen = re.findall(r"(\d+) intra-op threads? \((\d+) cores, other processes busy on", result.stdout)
    assert len(chosen) == 2, result.stdout  # once per training stage: teacher, distill
    assert all(int(count) < cores or cores == 1 for count, _ in chosen)
    assert "warning: measured while the machine was loaded" in result.stdout
    report = json.loads((tmp_path / "busy" / "report.json").read_text())
    load = report["measurement_load"]
    assert load["loaded"] and load["other_busy_cores_max"] >= 0.5 and load["threads"] == cores
    assert all(row["latency"]["threads"] == cores for row in report["rows"])  # not shrunk under load
    assert all(row["machine_load"]["source"] == "/proc/stat" for row in report["rows"])
    assert report["omp_wait_policy"]["value"] == "unset"  # OpenMP's default: edgekd leaves it alone
    markdown = (tmp_path / "busy" / "report.md").read_text()
    assert "> **Warning:** measured while the machine was loaded" in markdown
    assert "latency under load is not the device's latency" in markdown
    assert "OpenMP wait policy (PyTorch rows): unset (OpenMP default" in markdown
