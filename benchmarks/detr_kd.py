"""DETR distillation on the built-in detection scenes: teacher, student alone, every detection method.

The teacher is edgekd's shipped ``builtin:detr-mnv3l-scenes`` (``edgekd:detr-mnv3l`` trained by
benchmarks/detection_teacher.py on 4,750 other scenes for 14 epochs), as in the default detection run;
``--teacher-checkpoint none`` trains one per seed here instead (``--teacher-epochs``). Per seed: the
synthetic set (edgekd.detection.synthetic; default 3,000 train / 1,000 held-out scenes at 128 px, the
default run's) is written once; the student (``edgekd:detr-mnv3``) is trained from the same
initialisation (same seed) by each method of edgekd.detection.distill: ``none`` (the student alone),
``memory-mse``, ``kd-detr``, ``clockdistill``, for the default run's 7 epochs. Every model is scored on
the held-out scenes with COCO mAP@[.5:.95] and mAP@.5 (edgekd.detection.metrics: top-100 sigmoid
detections per image); wall time per training run.

Training loop (one for all, so the methods differ only in their loss): AdamW, weight decay 1e-4,
gradient clipping at norm 0.1, lr dropped ×0.1 for the last fifth of the epochs: DAB-DETR's
recipe (Liu et al., ICLR 2022: lr 1e-4, backbone lr 1e-5, wd 1e-4, clip 0.1, drop at 40 of 50
epochs) but for the lr. DAB-DETR's lr (and its tenfold lower backbone lr) is for an
ImageNet-pretrained backbone; ours start from random weights (no download here), where 1e-3 for
every parameter trains far faster (edgekd.tasks.DETECTION_TRAIN says what was measured; ``--lr``,
``--lr-backbone`` to change it). Batch 16 (DAB-DETR: 16 over 8 GPUs). The method's own
parameters (adapters) train with the transformer's lr.

    python benchmarks/detr_kd.py [--seeds 0 1 2] [--methods none clockdistill] [--epochs 7]
    python benchmarks/detr_kd.py --time-steps 20     # per-epoch time of teacher and student, then exit

Prints a table and writes benchmarks/results/detr_kd.json (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import math
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
from edgekd.detection.distill import DETECTION_METHODS, DetectionMethod, build_detection_method
from edgekd.detection.metrics import evaluate_dataset, postprocess
from edgekd.detection.synthetic import load_synthetic
from edgekd.models import build_model
from edgekd.models.checkpoint import load_weights
from edgekd.models.detr import DETR
from edgekd.report.build import environment

RESULTS = Path(__file__).resolve().parent / "results" / "detr_kd.json"
TEACHER, STUDENT = "edgekd:detr-mnv3l", "edgekd:detr-mnv3"
METHODS = ["none", "memory-mse", "kd-detr", "clockdistill"]
SHIPPED_TEACHER = "builtin:detr-mnv3l-scenes"


def _model(name: str, classes: int, seed: int) -> DETR:
    torch.manual_seed(seed)
    return build_model(name, classes, 3, kwargs={"task": "detection"})


def _targets(data: DetectionDataset, index: np.ndarray) -> list[dict[str, torch.Tensor]]:
    return [
        {"labels": torch.as_tensor(data.labels[i]), "boxes": torch.as_tensor(data.boxes[i])} for i in index
    ]


def _optimizer(model: DETR, method: DetectionMethod, args: argparse.Namespace) -> torch.optim.AdamW:
    backbone = list(model.backbone.parameters())
    ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if id(p) not in ids] + method.trainable_parameters()
    groups = [{"params": rest, "lr": args.lr}, {"params": backbone, "lr": args.lr_backbone}]
    return torch.optim.AdamW(groups, weight_decay=1e-4)


def train(
    model: DETR,
    method: DetectionMethod,
    teacher: DETR | None,
    data: DetectionDataset,
    epochs: int,
    args: argparse.Namespace,
    seed: int,
    max_steps: int | None = None,
) -> float:
    """Train ``model`` by ``method`` for ``epochs`` (or ``max_steps``); the wall time in seconds."""
    optimizer = _optimizer(model, method, args)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    steps_per_epoch = math.ceil(len(data) / args.batch)
    drop_at = int(round(0.8 * epochs)) * steps_per_epoch
    generator = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    step, start = 0, time.perf_counter()
    for _ in range(epochs):
        order = generator.permutation(len(data))
        for first in range(0, len(order), args.batch):
            index = order[first : first + args.batch]
            images = torch.from_numpy(data.images[index])
            loss = method.loss(images, _targets(data, index), model, teacher)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.1)
            optimizer.step()
            step += 1
            if step == drop_at:
                for group in optimizer.param_groups:
                    group["lr"] *= 0.1
            if max_steps is not None and step >= max_steps:
                return time.perf_counter() - start
    return time.perf_counter() - start


@torch.no_grad()
def score(model: DETR, data: DetectionDataset, batch: int = 64) -> dict[str, float]:
    model.eval()
    detections = []
    for first in range(0, len(data), batch):
        out = model(torch.from_numpy(data.images[first : first + batch]))
        detections += postprocess(out["logits"], out["boxes"])
    scores = evaluate_dataset(data, detections)
    return {"map": scores.map, "map50": scores.map50}


def _checkpoint(given: str) -> Path:
    """``builtin:NAME`` is the teacher edgekd ships (edgekd/teachers/NAME.safetensors), else a file."""
    if given.startswith(teachers.PREFIX):
        return teachers.weights(given.removeprefix(teachers.PREFIX))
    return Path(given)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def time_steps(args: argparse.Namespace, train_set: DetectionDataset, classes: int) -> dict:
    """Seconds per step of the teacher (set loss) and of the student under each method, per epoch."""
    steps_per_epoch = math.ceil(args.train / args.batch)
    teacher = _model(TEACHER, classes, 0)
    rows = {}
    teacher_method = build_detection_method("none", teacher, None, classes)
    rows["teacher"] = train(teacher, teacher_method, None, train_set, 1, args, 0, args.time_steps)
    for name in args.methods:
        student = _model(STUDENT, classes, 0)
        method = build_detection_method(name, student, teacher, classes)
        rows[name] = train(student, method, teacher, train_set, 1, args, 0, args.time_steps)
    steps = min(args.time_steps, steps_per_epoch)
    result = {
        name: {"s_per_step": wall / steps, "s_per_epoch": wall / steps * steps_per_epoch}
        for name, wall in rows.items()
    }
    title = f"{steps} steps at batch {args.batch}; {args.train} train scenes: {steps_per_epoch} steps/epoch"
    table = Table(title=title)
    for column in ("run", "s / step", "s / epoch (extrapolated)"):
        table.add_column(column)
    for name, row in result.items():
        table.add_row(name, f"{row['s_per_step']:.3f}", f"{row['s_per_epoch']:.0f}")
    console.print(table)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=DETECTION_METHODS.names())
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument(
        "--teacher-checkpoint",
        default=SHIPPED_TEACHER,
        help="teacher weights (a file or builtin:NAME); none: train one per seed for --teacher-epochs",
    )
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=7, help="student epochs, every method")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-backbone", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", type=Path, default=None, help="where the scenes are written (temp)")
    parser.add_argument("--time-steps", type=int, default=0, help="only time this many steps, then exit")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="edgekd-detr-kd-") as temp:
        root = args.data_dir or Path(temp)
        if args.time_steps:
            needed = min(args.train, args.batch * args.time_steps)  # only the scenes the timed steps use
            train_set, _ = load_synthetic(root, args.seeds[0], args.size, needed, args.val, args.size)
            time_steps(args, train_set, len(train_set.classes))
            return
        runs: dict[str, list[dict]] = {"teacher": [], **{name: [] for name in args.methods}}
        for seed in args.seeds:
            train_set, val_set = load_synthetic(
                root / f"seed{seed}", seed, args.size, args.train, args.val, args.size
            )
            classes = len(train_set.classes)
            teacher = _model(TEACHER, classes, seed)
            if args.teacher_checkpoint.lower() == "none":
                wall = train(
                    teacher,
                    build_detection_method("none", teacher, None, classes),
                    None,
                    train_set,
                    args.teacher_epochs,
                    args,
                    seed,
                )
            else:
                load_weights(teacher, _checkpoint(args.teacher_checkpoint), TEACHER)
                wall = 0.0
            runs["teacher"].append({"seed": seed, **score(teacher, val_set), "wall_s": wall})
            console.print(f"seed {seed} teacher: {runs['teacher'][-1]}")
            _write(args, runs, complete=False)
            for name in args.methods:
                student = _model(STUDENT, classes, seed)
                method = build_detection_method(name, student, teacher, classes)
                wall = train(student, method, teacher, train_set, args.epochs, args, seed)
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
        {"teacher": TEACHER, "student": STUDENT, "settings": settings, "complete": complete,
         "results": summary, "environment": environment()},
    )  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
