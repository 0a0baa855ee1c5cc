"""DETR distillation on the built-in detection scenes: teacher, student alone, every detection method.

The teacher is the default detection run's: edgekd's shipped ``builtin:detr-r18-scenes``
(``edgekd:detr-r18`` trained by benchmarks/detection_teacher.py on 4,750 other scenes); ``--teacher``
and ``--teacher-checkpoint`` name another (``builtin:NAME`` or a file), and ``--teacher-checkpoint none``
trains one per seed here instead (``--teacher-epochs``). Per seed: the
synthetic set (edgekd.detection.synthetic; default 3,000 train / 1,000 held-out scenes at 128 px, the
default run's) is written once; the student (``edgekd:detr-mnv3``) is trained from the same
initialisation (same seed) by each method of edgekd.detection.distill: ``none`` (the student alone),
``memory-mse``, ``kd-detr``, ``clockdistill``, for the default run's 14 epochs. Every model is scored on
the held-out scenes with COCO mAP@[.5:.95] and mAP@.5 (edgekd.detection.metrics: top-100 sigmoid
detections per image); wall time per training run.

Training: the pipeline's own loop, :func:`edgekd.detection.train.train_detector` (DAB-DETR's AdamW
recipe at lr 1e-3 for every parameter, batch 16, lr dropped tenfold for the last fifth of the
epochs, the teacher's encoder memory cached), so the methods differ only in their loss and the
figures are what a run gets. Its per-epoch score runs on the first ``--monitor`` held-out scenes;
the reported mAP is the last epoch's model on all ``--val``. Wall time: the whole call (cache
build, epochs, per-epoch monitor scoring).

    python benchmarks/detr_kd.py [--seeds 0 1 2] [--methods none clockdistill] [--epochs 14]

Prints a table and writes benchmarks/results/detr_kd.json (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from edgekd import atomic, teachers
from edgekd.console import console
from edgekd.detection.data import DetectionDataset
from edgekd.detection.distill import DETECTION_METHODS, build_detection_method
from edgekd.detection.synthetic import load_synthetic
from edgekd.detection.train import evaluate_model, train_detector
from edgekd.models import build_model
from edgekd.models.checkpoint import load_weights
from edgekd.models.detr import DETR
from edgekd.recipe import TrainSpec
from edgekd.report.build import environment
from edgekd.tasks import DETECTION_DEFAULTS

RESULTS = Path(__file__).resolve().parent / "results" / "detr_kd.json"
TEACHER, STUDENT = DETECTION_DEFAULTS["teacher.model"], DETECTION_DEFAULTS["student.model"]
METHODS = ["none", "memory-mse", "kd-detr", "clockdistill"]


def _model(name: str, classes: int, seed: int) -> DETR:
    torch.manual_seed(seed)
    return build_model(name, classes, 3, kwargs={"task": "detection"})


def train(
    model: DETR,
    method_name: str,
    teacher: DETR | None,
    data: tuple[DetectionDataset, DetectionDataset],
    epochs: int,
    args: argparse.Namespace,
    seed: int,
    folder: Path,
) -> float:
    """Train ``model`` by ``method_name`` for ``epochs`` with the pipeline's loop; the wall time in s."""
    train_set, monitor = data
    method = build_detection_method(method_name, model, teacher, len(train_set.classes))
    spec = TrainSpec(epochs=epochs, batch_size=args.batch, lr=args.lr, weight_decay=1e-4)
    start = time.perf_counter()
    train_detector(
        model, method, train_set, monitor, spec, seed, folder, f"detr_kd-{method_name}-{seed}",
        teacher=teacher, label=method_name, log=lambda _: None,
    )  # fmt: skip
    return time.perf_counter() - start


def score(model: DETR, data: DetectionDataset) -> dict[str, float]:
    scores = evaluate_model(model, data)
    return {"map": scores.map, "map50": scores.map50}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=DETECTION_METHODS.names())
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--teacher", default=TEACHER, help="the teacher's registered DETR")
    parser.add_argument(
        "--teacher-checkpoint",
        default=None,
        help="teacher weights (a file or builtin:NAME; default: the one edgekd ships for --teacher on the "
        "scenes); none: train one per seed for --teacher-epochs",
    )
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=14, help="student epochs, every method")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--monitor", type=int, default=100, help="held-out scenes scored every epoch")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", type=Path, default=None, help="where the scenes are written (temp)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.teacher_checkpoint is None:
        shipped = teachers.shipped_for(args.teacher, "scenes")
        if shipped is None:
            parser.error(f"no shipped teacher for {args.teacher}: pass --teacher-checkpoint FILE or none")
        args.teacher_checkpoint = f"{teachers.PREFIX}{shipped}"
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="edgekd-detr-kd-") as temp:
        root = args.data_dir or Path(temp)
        runs: dict[str, list[dict]] = {"teacher": [], **{name: [] for name in args.methods}}
        for seed in args.seeds:
            train_set, val_set = load_synthetic(
                root / f"seed{seed}", seed, args.size, args.train, args.val, args.size
            )
            data = (train_set, val_set.subset(np.arange(min(args.monitor, len(val_set)))))
            classes = len(train_set.classes)
            teacher = _model(args.teacher, classes, seed)
            if args.teacher_checkpoint.lower() == "none":
                folder = Path(temp) / f"teacher-{seed}"
                wall = train(teacher, "none", None, data, args.teacher_epochs, args, seed, folder)
            else:
                load_weights(teacher, teachers.resolve(args.teacher_checkpoint), args.teacher)
                wall = 0.0
            runs["teacher"].append({"seed": seed, **score(teacher, val_set), "wall_s": wall})
            console.print(f"seed {seed} teacher: {runs['teacher'][-1]}")
            _write(args, runs, complete=False)
            for name in args.methods:
                student = _model(STUDENT, classes, seed)
                wall = train(
                    student, name, teacher, data, args.epochs, args, seed, Path(temp) / f"{name}-{seed}"
                )
                runs[name].append({"seed": seed, **score(student, val_set), "wall_s": wall})
                console.print(f"seed {seed} {name}: {runs[name][-1]}")
                _write(args, runs, complete=False)

    summary = _write(args, runs, complete=True)
    _table(args, summary)


def _table(args: argparse.Namespace, summary: dict[str, dict]) -> None:
    alone = summary.get("none", {}).get("map")
    table = Table(
        title=f"DETR KD on synthetic scenes ({args.train}/{args.val} at {args.size} px, seeds {args.seeds})"
    )
    for column in ("model / method", "mAP@[.5:.95]", "mAP@.5", "vs student alone", "train wall s"):
        table.add_column(column)
    for name, row in summary.items():
        gain = "" if alone is None or name in ("teacher", "none") else f"{100 * (row['map'] - alone):+.1f}"
        table.add_row(
            name,
            f"{100 * row['map']:.1f} ± {100 * row['map_std']:.1f}",
            f"{100 * row['map50']:.1f} ± {100 * row['map50_std']:.1f}",
            gain,
            f"{row['wall_s']:.0f}",
        )
    console.print(table)
    console.print(f"wrote {args.out}")


def _write(args: argparse.Namespace, runs: dict[str, list[dict]], complete: bool) -> dict[str, dict]:
    """Write the results so far to ``args.out`` (after every run, so a stopped run keeps its figures)."""
    summary = {}
    for name, rows in runs.items():
        if not rows:
            continue
        map_mean, map_std = _mean_std([r["map"] for r in rows])
        m50_mean, m50_std = _mean_std([r["map50"] for r in rows])
        summary[name] = {
            "map": map_mean, "map_std": map_std, "map50": m50_mean, "map50_std": m50_std,
            "wall_s": statistics.fmean(r["wall_s"] for r in rows), "runs": rows,
        }  # fmt: skip
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    atomic.write_json(
        args.out,
        {"teacher": args.teacher, "student": STUDENT, "settings": settings, "complete": complete,
         "results": summary, "environment": environment()},
    )  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
