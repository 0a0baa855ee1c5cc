"""benchmarks/default_task.py (issue 10: how large must the built-in RF task be for distillation to
matter), run for real on a tiny candidate, and the kd_methods task settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgekd.recipe import load_recipe

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import default_task  # noqa: E402
import kd_methods  # noqa: E402


def test_kd_methods_radio_task_is_the_default_and_digits_pins_its_epochs():
    assert kd_methods.TASKS["radio"] == []
    digits = load_recipe(None, kd_methods.TASKS["digits"])
    assert digits.data.name == "digits"
    assert digits.teacher.train.epochs == 15 and digits.distill.train.epochs == 15


def test_tiny_candidate_runs_teacher_and_student_alone(tmp_path: Path):
    candidate = default_task.parse_candidate("2:1::1")
    assert candidate == {"frames_per_class_snr": 2, "teacher_epochs": 1, "student_epochs": 1}
    run = default_task.run_candidate(candidate, 0, [], tmp_path)
    assert (run["frames"], run["train_frames"]) == (440, 330)
    for model in ("teacher", "student_alone"):
        assert 0.0 <= run[model]["overall"] <= 1.0 and 0.0 <= run[model]["high_snr"] <= 1.0
    gap = 100 * (run["teacher"]["overall"] - run["student_alone"]["overall"])
    assert run["gap_pts"] == pytest.approx(gap, abs=0.01)
    assert len(run["teacher_history"]) == 1 and run["wall_s"]["teacher"] > 0
    estimate = run["estimated_alone_s"]
    assert estimate["teacher"] == pytest.approx(default_task.TEACHER_S_PER_FRAME_EPOCH * 330, abs=0.1)
    summary = default_task.summarise([run])
    assert summary["gap_pts"] == run["gap_pts"]


def test_malformed_candidate_is_one_line_and_exit_code_2():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "default_task.py"), "--candidates", "100"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "edgekd: error: --candidates '100': expected FRAMES:TEACHER_EPOCHS[:TEACHER_LR[:STUDENT_EPOCHS]], "
        "e.g. 100:15"
    ]
