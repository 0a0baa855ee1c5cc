"""Issue 11's "done when", as a new user runs it: their model file, their npz, from the command line.

``edgekd compress --teacher py:FILE:big --student py:FILE:small --data npz:FILE --target x86-openvino``
gives a report and a bundle that verifies; ``edgekd deploy model.onnx --target cpu --data npz:FILE``
does the same for an ONNX file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_cli import run_cli

MODELS = "py:tests/assets/user_models.py"
FAST = [
    "--set", "teacher.train.epochs=2", "--set", "distill.train.epochs=2",
    "--set", "quantize.calibration_samples=64", "--set", "profile.iterations=10",
    "--set", "profile.warmup=2", "--set", "bundle.eval_samples=32", "--set", "export.parity_samples=16",
]  # fmt: skip


def write_npz(path: Path, seed: int = 0) -> Path:
    """Two-tone (2, 48) sequences of 4 classes (the tone's frequency), own split, string groups."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = rng.integers(0, 4, n)
        t = np.arange(48)
        phase = rng.uniform(0, 2 * np.pi, (n, 1))
        x = np.stack(
            [np.sin(0.25 * (y[:, None] + 1) * t + phase), np.cos(0.25 * (y[:, None] + 1) * t + phase)], 1
        )
        noise = rng.choice(["quiet", "noisy"], n)
        x += np.where(noise == "noisy", 0.8, 0.1)[:, None, None] * rng.standard_normal(x.shape)
        return x.astype(np.float32), y, noise

    (x_train, y_train, g_train), (x_val, y_val, g_val) = split(320), split(96)
    np.savez(
        path, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, groups_train=g_train,
        groups_val=g_val, classes=np.array(["f1", "f2", "f3", "f4"]),
    )  # fmt: skip
    return path


@pytest.mark.slow
def test_user_models_and_npz_through_compress_and_deploy(tmp_path: Path) -> None:
    data = write_npz(tmp_path / "my.npz")
    runs = tmp_path / "runs"
    result = run_cli(
        "compress", "--teacher", f"{MODELS}:big", "--student", f"{MODELS}:small", "--data", f"npz:{data}",
        "--target", "x86-openvino", "--method", "kd", "--set", f"runs_dir={runs}", *FAST,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    run_dir = runs / "my"  # the run is named after the data file
    report = json.loads((run_dir / "report.json").read_text())
    assert report["teacher"]["model"] == f"{MODELS}:big" and report["student"]["model"] == f"{MODELS}:small"
    assert report["data"]["classes"] == ["f1", "f2", "f3", "f4"]
    assert report["data"]["provenance"]
    int8 = next(row for row in report["rows"] if row.get("precision") == "int8" and "artifact" in row)
    assert set(int8["accuracy"]["per_group"]) == {"quiet", "noisy"}
    assert "Kept in float" in (run_dir / "report.md").read_text()  # the GRU / einsum stay in float
    verified = run_cli("verify-bundle", str(run_dir / report["bundle"]))
    assert verified.returncode == 0, verified.stderr + verified.stdout

    exported = run_dir / report["export"]["onnx_file"]
    deployed = run_cli(
        "deploy", str(exported), "--target", "cpu", "--data", f"npz:{data}", "--name", "from-onnx",
        "--set", f"runs_dir={runs}", *FAST,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stderr + deployed.stdout
    deploy_report = json.loads((runs / "from-onnx" / "report.json").read_text())
    assert deploy_report["mode"] == "deploy"
    fp32 = next(row for row in deploy_report["rows"] if row.get("precision") == "fp32" and "artifact" in row)
    assert fp32["accuracy"]["accuracy"] == pytest.approx(int8["accuracy"]["accuracy"], abs=0.1)
    verified = run_cli("verify-bundle", str(runs / "from-onnx" / deploy_report["bundle"]))
    assert verified.returncode == 0, verified.stderr + verified.stdout
