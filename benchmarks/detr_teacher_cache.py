"""The DETR teacher-memory cache: distillation time per epoch with the teacher live vs cached.

Side by side in one process, on the built-in scenes (default run's 128 px, ``--train`` scenes), the
shipped MobileNetV3-large teacher (``builtin:detr-mnv3l-scenes``) and the student ``edgekd:detr-mnv3``:
one epoch of :func:`edgekd.detection.train.train_detector` per method with ``cache_teacher`` off (the
teacher's backbone, encoder and decoder run every step) and on (its encoder memory is computed once before the
epochs, :func:`edgekd.detection.train.teacher_memories`; only its decoder runs per step). Reports the
cache's size and build time and the epoch times; the cache pays from the first epoch when building it
costs less than one epoch's teacher encoder passes. Run it alone on the machine.

    python benchmarks/detr_teacher_cache.py [--train 640] [--methods memory-mse clockdistill]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.table import Table

from edgekd import atomic, teachers
from edgekd.console import console
from edgekd.detection.distill import build_detection_method
from edgekd.detection.synthetic import load_synthetic
from edgekd.detection.train import teacher_memories, train_detector
from edgekd.models import build_model
from edgekd.models.checkpoint import load_weights
from edgekd.recipe import TrainSpec
from edgekd.report.build import environment

RESULTS = Path(__file__).resolve().parent / "results" / "detr_teacher_cache.json"
TEACHER, STUDENT, SHIPPED = "edgekd:detr-mnv3l", "edgekd:detr-mnv3", "detr-mnv3l-scenes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=640, help="train scenes (one epoch each way)")
    parser.add_argument("--methods", nargs="+", default=["memory-mse", "kd-detr", "clockdistill"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    spec = TrainSpec(epochs=1, batch_size=16, lr=1e-3, weight_decay=1e-4)
    with tempfile.TemporaryDirectory(prefix="edgekd-detr-cache-") as temp:
        train_set, val_set = load_synthetic(Path(temp) / "data", 0, 128, args.train, 16)
        classes = len(train_set.classes)
        teacher = build_model(TEACHER, classes, 3, kwargs={"task": "detection"})
        load_weights(teacher, teachers.weights(SHIPPED), TEACHER)
        start = time.perf_counter()
        cache = teacher_memories(teacher, train_set, torch.device("cpu"))
        build_s = time.perf_counter() - start
        rows = {}
        for name in args.methods:
            row = {}
            for cached in (False, True):
                torch.manual_seed(0)
                student = build_model(STUDENT, classes, 3, kwargs={"task": "detection"})
                method = build_detection_method(name, student, teacher, classes)
                folder = Path(temp) / f"{name}-{cached}"
                result = train_detector(
                    student, method, train_set, val_set, spec, 0, folder, "timing",
                    teacher=teacher, log=lambda _: None, cache_teacher=cached,
                )  # fmt: skip
                row["cached_epoch_s" if cached else "live_epoch_s"] = result.history[0]["train_s"]
            row["speedup"] = round(row["live_epoch_s"] / row["cached_epoch_s"], 2)
            rows[name] = row
    result = {
        "benchmark": "detr_teacher_cache",
        "settings": {"train_scenes": args.train, "image_size": 128, "teacher": f"builtin:{SHIPPED}",
                     "student": STUDENT, "batch_size": spec.batch_size, "threads": torch.get_num_threads()},
        "cache": {"bytes": cache.numel() * cache.element_size(), "shape": list(cache.shape),
                  "build_s": round(build_s, 2)},
        "methods": rows,
        "environment": environment(),
    }  # fmt: skip
    table = Table(title=f"one distillation epoch on {args.train} scenes: teacher live vs memory cached")
    for column in ("method", "live s", "cached s", "speedup"):
        table.add_column(column)
    for name, row in rows.items():
        live, cached = row["live_epoch_s"], row["cached_epoch_s"]
        table.add_row(name, f"{live:.1f}", f"{cached:.1f}", f"{row['speedup']:.2f}x")
    console.print(table)
    megabytes = result["cache"]["bytes"] / 1024**2
    console.print(f"cache: {megabytes:.1f} MiB for {args.train} scenes, built in {build_s:.1f} s")
    atomic.write_json(args.out, result)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
