"""Train the built-in RF task's shipped teacher, and measure the room it leaves distillation.

A real teacher is trained once, on more data than the student ever sees, and then distilled from
many times; the built-in task now works the same way. This script trains the ClST teacher through
edgekd's own teacher stage on a larger synthetic set that shares no frame with any user run's data
(the generator is seeded with ``TEACHER_DATA_SEED`` = 2**32 - 1, the largest seed a recipe accepts;
a run with that very seed would share frames with it) and ships it as
``edgekd/teachers/clst-radio-synthetic.safetensors`` with its provenance in ``.json`` beside it
(``teacher.checkpoint: builtin:clst-radio-synthetic`` in the default recipe). Then, on the default
task (the default recipe's data and seed), it measures the shipped teacher and the student trained
alone on the labels (``distill.method=none``): held-out accuracy overall and at SNR >= 10 dB, and the
gap, into benchmarks/results/default_task.json (candidate ``shipped-teacher``).

    python benchmarks/default_teacher.py [--frames 200] [--epochs 25] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from safetensors.torch import save_file

from edgekd import atomic
from edgekd.api import compress
from edgekd.console import console
from edgekd.data import build_dataset
from edgekd.distill.trainer import predict_accuracy
from edgekd.models import build_model
from edgekd.models.checkpoint import load_weights
from edgekd.recipe import MAX_SEED, load_recipe
from edgekd.report.build import environment

HERE = Path(__file__).resolve().parent
SHIPPED = HERE.parent / "edgekd" / "teachers" / "clst-radio-synthetic"
RESULTS = HERE / "results" / "default_task.json"
TEACHER_DATA_SEED = MAX_SEED
BUILTIN = "builtin:clst-radio-synthetic"
HIGH_SNR_DB = 10
GOAL_GAP_PTS = 5.0


def train_teacher(frames: int, epochs: int, runs_dir: Path) -> dict:
    """The teacher stage on ``frames`` per (class, SNR) of the disjoint set; its record and checkpoint."""
    recipe = load_recipe(
        None,
        [
            f"runs_dir={runs_dir}",
            "name=shipped-teacher",
            f"seed={TEACHER_DATA_SEED}",
            f"data.frames_per_class_snr={frames}",
            "data.val_fraction=0.05",
            "teacher.checkpoint=null",
            "teacher.store=false",
            f"teacher.train.epochs={epochs}",
        ],
    )
    start = time.perf_counter()
    outputs = compress(recipe, until="teacher")["teacher"]
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "outputs": outputs,
        "recipe": recipe.model_dump(mode="json", include={"seed", "data", "teacher"}),
        "file": runs_dir / "shipped-teacher" / outputs["model_file"],
    }


def ship(
    trained: dict,
    shipped: Path = SHIPPED,
    trained_by: str = "benchmarks/default_teacher.py",
    score: dict | None = None,
    half: bool = False,
) -> Path:
    """Write the teacher's state dict as safetensors (float16 with ``half``: a shipped file half the
    size; loading casts it back to the model's float32) and its provenance JSON into edgekd/teachers/.
    ``score`` is the teacher's own held-out score (default: the classification accuracy)."""
    state = torch.load(trained["file"], weights_only=True)["state_dict"]
    shipped.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        key: (value.half() if half and value.is_floating_point() else value).contiguous()
        for key, value in state.items()
    }
    save_file(tensors, str(shipped.with_suffix(".safetensors")))
    history = trained["outputs"]["history"]
    atomic.write_json(
        shipped.with_suffix(".json"),
        {
            "model": trained["outputs"]["model"],
            "trained_by": f"{trained_by} (edgekd's teacher stage, labels only)",
            "data": trained["recipe"]["data"],
            "data_seed": TEACHER_DATA_SEED,
            "train": trained["recipe"]["teacher"]["train"],
            **(score or {"own_held_out_accuracy": trained["outputs"]["val_accuracy"]}),
            "weights_dtype": "float16" if half else "float32",
            "epochs_run": len(history),
            "wall_s": trained["wall_s"],
            "environment": environment(),
        },
    )
    return shipped.with_suffix(".safetensors")


def measure(seed: int, runs_dir: Path) -> dict:
    """On the default task with ``seed``: the shipped teacher vs the student trained alone."""
    sets = [f"runs_dir={runs_dir}", f"name=alone-s{seed}", f"seed={seed}", "distill.method=none"]
    recipe = load_recipe(None, [*sets, f"teacher.checkpoint={BUILTIN}"])
    train, val, meta = build_dataset(recipe.data, recipe.seed)
    start = time.perf_counter()
    outputs = compress(recipe, until="distill")
    wall = time.perf_counter() - start
    high = np.flatnonzero(val.snr >= HIGH_SNR_DB)

    def scores(name: str, file: Path) -> dict:
        model = build_model(name, num_classes=len(meta.classes), in_channels=meta.input_shape[0])
        load_weights(model, file, name)
        return {
            "overall": round(predict_accuracy(model, val), 4),
            "high_snr": round(predict_accuracy(model, val.subset(high)), 4),
        }

    teacher = scores(recipe.teacher.model, runs_dir / f"alone-s{seed}" / outputs["teacher"]["model_file"])
    student = scores(recipe.student.model, runs_dir / f"alone-s{seed}" / outputs["distill"]["model_file"])
    return {
        "seed": seed,
        "train_frames": len(train),
        "eval_frames": len(val),
        "teacher": teacher,
        "student_alone": student,
        "gap_pts": round(100 * (teacher["overall"] - student["overall"]), 2),
        "gap_high_snr_pts": round(100 * (teacher["high_snr"] - student["high_snr"]), 2),
        "teacher_and_student_wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="teacher set: frames per (class, SNR)")
    parser.add_argument("--epochs", type=int, default=25, help="teacher epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="default-task seeds measured")
    parser.add_argument("--measure-only", action="store_true", help="keep the shipped teacher, only measure")
    args = parser.parse_args()
    runs_dir = Path(tempfile.mkdtemp(prefix="edgekd-default-teacher-"))
    try:
        if not args.measure_only:
            console.print(
                f"training the teacher: {args.frames} frames per (class, SNR), {args.epochs} epochs"
            )
            console.print(f"shipped {ship(train_teacher(args.frames, args.epochs, runs_dir))}")
        provenance = json.loads(SHIPPED.with_suffix(".json").read_text(encoding="utf-8"))
        runs = [measure(seed, runs_dir) for seed in args.seeds]
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    gaps = [run["gap_pts"] for run in runs]
    summary = {
        "gap_pts_mean": round(float(np.mean(gaps)), 2),
        "gap_high_snr_pts_mean": round(float(np.mean([run["gap_high_snr_pts"] for run in runs])), 2),
        "goal_gap_pts": GOAL_GAP_PTS,
        "goal_met": bool(np.mean(gaps) >= GOAL_GAP_PTS),
    }
    table = Table(title="default task: shipped teacher vs student alone (held-out accuracy)")
    for column in ("seed", "teacher", "teacher >=10 dB", "student alone", "student >=10 dB", "gap pts"):
        table.add_column(column, justify="right")
    for run in runs:
        table.add_row(
            str(run["seed"]),
            f"{run['teacher']['overall']:.4f}",
            f"{run['teacher']['high_snr']:.4f}",
            f"{run['student_alone']['overall']:.4f}",
            f"{run['student_alone']['high_snr']:.4f}",
            f"{run['gap_pts']:+.2f}",
        )
    console.print(table)
    kept = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.is_file() else {"candidates": {}}
    kept["benchmark"] = "default_task"
    kept["candidates"]["shipped-teacher"] = {
        "settings": {"teacher": provenance, "default_task": "recipes/radio-default.yaml"},
        "runs": runs,
        "summary": summary,
    }
    kept["environment"] = environment()
    atomic.write_json(RESULTS, kept)
    console.print(f"gap {summary['gap_pts_mean']:+.2f} pts (goal >= {GOAL_GAP_PTS}); wrote {RESULTS}")


if __name__ == "__main__":
    main()
