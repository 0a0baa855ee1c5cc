"""The `edgekd` command as a user runs it: help, dry run, targets, and one clear line (exit 2) per mistake."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EDGEKD = [sys.executable, "-c", "from edgekd.cli import main; main()"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEKD, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_compress_help_lists_every_recipe_field():
    result = run_cli("compress", "--help")
    assert result.returncode == 0
    for field in (
        "distill.temperature",
        "quantize.calibration_samples",
        "profile.iterations",
        "data.snr_min",
        "--target",
        "--force",
        "--dry-run",
        "--set",
    ):
        assert field in result.stdout, field


def test_dry_run_prints_resolved_recipe():
    result = run_cli(
        "compress", "--dry-run", "--target", "x86-ort", "--epochs", "2", "--set", "distill.alpha=0.5"
    )
    assert result.returncode == 0, result.stderr
    assert "target: x86-ort" in result.stdout and "alpha: 0.5" in result.stdout
    assert result.stdout.count("epochs: 2") == 2


def test_targets_lists_cpu_as_available():
    result = run_cli("targets")
    assert result.returncode == 0, result.stderr
    assert "x86-ort" in result.stdout and "cpu" in result.stdout and "yes" in result.stdout


def test_malformed_yaml(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("distill: {method: kd\n")
    assert_user_error(run_cli("compress", "--recipe", str(recipe)), "malformed YAML", str(recipe))


def test_unknown_field_suggests_close_one(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("distill:\n  temprature: 2\n")
    assert_user_error(
        run_cli("compress", "--recipe", str(recipe)), "distill.temprature", "distill.temperature"
    )


def test_unknown_target_lists_known():
    assert_user_error(
        run_cli("compress", "--target", "jetsn", "--set", "runs_dir=/tmp/x"),
        "unknown target 'jetsn'",
        "x86-ort",
    )


def test_unknown_model_lists_known(tmp_path: Path):
    assert_user_error(
        run_cli("compress", "--student", "edgekd:kd-cnnn", "--set", f"runs_dir={tmp_path}"),
        "edgekd:kd-cnnn",
        "edgekd:kd-cnn",
    )


def test_missing_dataset_file(tmp_path: Path):
    missing = tmp_path / "RML2016.10a_dict.pkl"
    assert_user_error(
        run_cli(
            "compress", "--data", "rml2016", "--data-path", str(missing), "--set", f"runs_dir={tmp_path}"
        ),
        str(missing),
    )


def test_truncated_dataset_file(tmp_path: Path):
    frames = {(mod, snr): np.zeros((4, 2, 128), np.float32) for mod in ("BPSK", "QPSK") for snr in (0, 10)}
    data = pickle.dumps(frames, protocol=2)
    truncated = tmp_path / "RML2016.10a_dict.pkl"
    truncated.write_bytes(data[: len(data) // 2])
    assert_user_error(
        run_cli(
            "compress", "--data", "rml2016", "--data-path", str(truncated), "--set", f"runs_dir={tmp_path}"
        ),
        str(truncated),
    )


def test_checkpoint_of_another_model(tmp_path: Path):
    import torch

    from edgekd.models import build_model
    from edgekd.models.checkpoint import save_checkpoint

    checkpoint = tmp_path / "teacher.pt"
    save_checkpoint(checkpoint, build_model("edgekd:cnn", num_classes=11), "edgekd:cnn", {})
    assert torch.load(checkpoint, weights_only=True)["model"] == "edgekd:cnn"
    assert_user_error(
        run_cli(
            "compress",
            "--teacher-checkpoint",
            str(checkpoint),
            "--set",
            f"runs_dir={tmp_path}",
            "--set",
            "data.frames_per_class_snr=2",
        ),
        str(checkpoint),
    )


def test_unwritable_output_dir(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_user_error(
        run_cli("compress", "--set", f"runs_dir={blocker}/runs"),
        "cannot write the run directory",
        str(blocker),
    )


@pytest.mark.parametrize(
    "args",
    [
        ("compress", "--force", "distil", "--set", "runs_dir=/tmp/edgekd-never"),
        ("compress", "--until", "exprt", "--set", "runs_dir=/tmp/edgekd-never"),
    ],
)
def test_unknown_stage_names(args):
    assert_user_error(run_cli(*args), "no such stage")


def test_methods_lists_every_method_with_its_options():
    from edgekd.distill.methods import METHODS

    result = run_cli("methods")
    assert result.returncode == 0, result.stderr
    for name in METHODS.names():
        assert name in result.stdout, name
    assert "beta=0.0" in result.stdout  # skd's option and default


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("distill.options.skd.gamma=1", ("distill.options.skd.gamma", "unknown option", "beta=0.0")),
        ("distill.options.skd.beta=-1", ("distill.options.skd.beta", "greater than or equal to 0")),
        ("distill.options.nosuchmethod.x=1", ("distillation method 'nosuchmethod'",)),
    ],
)
def test_bad_method_options(override, fragments):
    assert_user_error(run_cli("compress", "--set", override), *fragments)


def test_label_fraction_needs_a_semi_supervised_method():
    result = run_cli("compress", "--set", "distill.label_fraction=0.2", "--method", "skd")
    assert_user_error(result, "distill.label_fraction=0.2", "'skd' needs every label", "dho")
