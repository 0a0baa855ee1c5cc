"""How fast a DETR from random weights learns the built-in scenes: one training run per variant.

Each variant trains one model alone (method ``none``: DETR's set loss, plus the dense auxiliary term
where the model has one) with :func:`edgekd.detection.train.train_detector`, the loop of
``edgekd compress``, and records its per-epoch held-out mAP@[.5:.95] and mAP@.5 (COCO, top-100
detections per image). The variants are the ones behind the detector's defaults
(:mod:`edgekd.models.detr`, :data:`edgekd.tasks.DETECTION_TRAIN`): stride 32 with learned anchors vs
stride 16 with query selection, with and without the dense term, the lr, the teacher's backbone and
the number of train scenes. mAP does not depend on machine load; the wall times do (run alone for them).

    python benchmarks/detr_convergence.py                      # every variant (hours on 2 CPU cores)
    python benchmarks/detr_convergence.py --only student-dense-1e-3 --threads 2

Prints a table and writes benchmarks/results/detr_convergence.json (``--out`` elsewhere), after every run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from rich.table import Table

from edgekd import atomic
from edgekd.console import console
from edgekd.detection.distill import build_detection_method
from edgekd.detection.synthetic import load_synthetic
from edgekd.detection.train import build_detector, train_detector
from edgekd.recipe import TrainSpec
from edgekd.report.build import environment

RESULTS = Path(__file__).resolve().parent / "results" / "detr_convergence.json"
VAL_SCENES = 300
OLD = {"feature_stride": 32, "query_selection": False, "dense_loss_weight": 0.0}  # the design before
SELECTION = {"feature_stride": 16, "query_selection": True}

#: name: (model, lr, epochs, train scenes, factory keywords)
VARIANTS: dict[str, tuple[str, float, int, int, dict]] = {
    "teacher-r18-stride32-anchors-2e-4": ("edgekd:detr-r18", 2e-4, 10, 900, OLD),
    "teacher-r18-selection-2e-4": ("edgekd:detr-r18", 2e-4, 10, 900, {**SELECTION, "dense_loss_weight": 0.0}),
    "teacher-r18-selection-dense-2e-4": ("edgekd:detr-r18", 2e-4, 10, 900, SELECTION),
    "teacher-r18-selection-dense-1e-3": ("edgekd:detr-r18", 1e-3, 15, 900, SELECTION),
    "student-selection-5e-4": ("edgekd:detr-mnv3", 5e-4, 15, 900, {**SELECTION, "dense_loss_weight": 0.0}),
    "student-selection-dense-5e-4": ("edgekd:detr-mnv3", 5e-4, 15, 900, SELECTION),
    "student-selection-1e-3": ("edgekd:detr-mnv3", 1e-3, 30, 900, {**SELECTION, "dense_loss_weight": 0.0}),
    "student-dense-1e-3": ("edgekd:detr-mnv3", 1e-3, 30, 900, SELECTION),
    "student-dense-1e-3-3000": ("edgekd:detr-mnv3", 1e-3, 20, 3000, SELECTION),
    "teacher-r18-dense-3e-4-3000": ("edgekd:detr-r18", 3e-4, 10, 3000, SELECTION),
    "teacher-mnv3l-dense-1e-3-3000": ("edgekd:detr-mnv3l", 1e-3, 10, 3000, SELECTION),
}


def run(name: str, root: Path, seed: int) -> dict:
    model_name, lr, epochs, train_scenes, kwargs = VARIANTS[name]
    train_set, val_set = load_synthetic(root / f"n{train_scenes}", seed, 128, train_scenes, VAL_SCENES)
    meta = SimpleNamespace(classes=train_set.classes, input_shape=(3, 128, 128))
    torch.manual_seed(seed)
    model = build_detector(model_name, meta, "model", kwargs)
    method = build_detection_method("none", model, None, len(meta.classes))
    spec = TrainSpec(epochs=epochs, batch_size=16, lr=lr, weight_decay=1e-4)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgekd-detr-conv-") as stage:
        result = train_detector(model, method, train_set, val_set, spec, seed, Path(stage), name, label=name)
    return {
        "model": model_name, "lr": lr, "epochs": epochs, "train_scenes": train_scenes, "kwargs": kwargs,
        "wall_s": round(time.perf_counter() - start, 1), "history": result.history,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", type=Path, default=None, help="where the scenes are written (temp)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="edgekd-detr-conv-data-") as temp:
        for name in args.only:
            runs[name] = run(name, args.data_dir or Path(temp), args.seed)
            atomic.write_json(
                args.out,
                {"seed": args.seed, "val_scenes": VAL_SCENES, "runs": runs, "environment": environment()},
            )
    table = Table(
        title=f"DETR convergence on the built-in scenes (seed {args.seed}, {VAL_SCENES} held-out scenes)"
    )
    for column in (
        "variant",
        "train scenes",
        "epochs",
        "lr",
        "mAP@[.5:.95]",
        "mAP@.5",
        "best mAP@.5",
        "wall s",
    ):
        table.add_column(column)
    for name, row in runs.items():
        last = row["history"][-1]
        best = max(r["val_map50"] or 0.0 for r in row["history"])
        table.add_row(
            name, str(row["train_scenes"]), str(row["epochs"]), f"{row['lr']:g}",
            f"{100 * (last['val_map'] or 0):.1f}", f"{100 * (last['val_map50'] or 0):.1f}",
            f"{100 * best:.1f}", f"{row['wall_s']:.0f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
