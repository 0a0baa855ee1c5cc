"""Does the DisWOT ranking predict which student distils best? Kendall tau against real distillation.

DisWOT's semantic term compares Grad-CAM maps of the last feature map, so it needs a last map with
spatial extent: the paper scores 32x32 CIFAR students whose last maps are 8x8. Timm ImageNet
architectures downsample 32x: on 32x32 inputs their last map is 1x1, where the score degenerates to
comparing logits (``edgekd search-student`` then prints a warning and flags the candidate). So the
default task here is the MNIST ImageFolder (5,000 real digits as PNG files, written by
``benchmarks/mnist_folder.py``, read through ``data.name=imagefolder``) resized to --image-size 64
(2x2 last maps; 96 gives 3x3), with one teacher (timm:resnet18, trained once on the labels with the
recipe's teacher training, or --teacher-checkpoint) throughout:

1. ``edgekd search-student``'s library call ranks the candidate students by their DisWOT score
   (random initialisation, one seeded batch of --batch train images, no training; lower = better);
2. every candidate is then distilled from that same teacher checkpoint with edgekd (method ``kd``,
   the recipe's epochs or --epochs, same seed) and scored on the held-out split (last epoch, the
   deployed model; the best epoch is recorded too).

Reported: Kendall's tau between -score (so that +1 means the DisWOT order is the accuracy order) and
the distilled accuracy, with its p-value, printed next to the same tau for the two trivial proxies
parameter count and FLOPs (bigger = better), and for the semantic and relation terms alone; each
candidate's last-map shape and any map warning are kept. ``--data digits`` is scikit-learn's 8x8
digits (resized to --image-size too).

Prints a table and writes benchmarks/results/student_search.json.
    python benchmarks/student_search.py [--data imagefolder|digits] [--folder DIR] [--image-size 64]
        [--candidates timm:a timm:b ...] [--epochs 15] [--seed 0] [--teacher-checkpoint FILE] [--batch 64]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from rich.table import Table
from scipy.stats import kendalltau

from edgekd import atomic
from edgekd.api import compress, search_student
from edgekd.console import console
from edgekd.distill.search import check_candidates
from edgekd.recipe import load_recipe
from edgekd.report.build import environment

RESULTS = Path(__file__).resolve().parent / "results" / "student_search.json"
TEACHER = "timm:resnet18"
CANDIDATES = [
    "timm:mobilenetv3_small_050",
    "timm:mobilenetv3_small_075",
    "timm:mobilenetv3_small_100",
    "timm:mobilenetv3_large_075",
    "timm:mobilenetv2_050",
    "timm:mobilenetv2_100",
    "timm:ghostnet_050",
    "timm:ghostnet_100",
    "timm:lcnet_050",
    "timm:lcnet_100",
    "timm:regnetx_002",
    "timm:efficientnet_b0",
    "timm:resnet10t",
    "timm:resnet14t",
]


def _task(data: str, folder: Path | None, image_size: int) -> list[str]:
    """Recipe overrides of the task: the dataset and the side images are resized to."""
    if data == "digits":
        task = ["data.name=digits"]
    else:
        if folder is None:
            from mnist_folder import write_folder  # benchmarks/ is on sys.path: the scripts run from there

            folder = write_folder()
        task = ["data.name=imagefolder", f"data.path={folder.resolve()}"]
    return [*task, f"data.image_size={image_size}", f"teacher.model={TEACHER}", "teacher.checkpoint=null"]


def _tau(proxy: list[float], accuracy: list[float]) -> dict[str, float | None]:
    """Kendall's tau-b of ``proxy`` (higher = predicted better) against ``accuracy``, with its p-value."""
    if len(proxy) < 2:
        return {"tau": None, "p_value": None}
    result = kendalltau(proxy, accuracy)
    return {"tau": round(float(result.statistic), 4), "p_value": round(float(result.pvalue), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("imagefolder", "digits"), default="imagefolder")
    parser.add_argument("--folder", type=Path, default=None, help="ImageFolder (default: the MNIST folder)")
    parser.add_argument("--image-size", type=int, default=64, help="side images are resized to")
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES)
    parser.add_argument("--epochs", type=int, default=None, help="distillation (and teacher) epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64, help="DisWOT scoring batch")
    parser.add_argument("--teacher-checkpoint", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    parser.add_argument("--out", type=Path, default=RESULTS, help="result JSON")
    args = parser.parse_args()
    names = check_candidates(args.candidates)
    runs_dir = Path(tempfile.mkdtemp(prefix="edgekd-student-search-"))
    task = _task(args.data, args.folder, args.image_size)
    common = [*task, f"runs_dir={runs_dir}", f"seed={args.seed}", *args.overrides]
    if args.epochs is not None:
        common += [f"teacher.train.epochs={args.epochs}", f"distill.train.epochs={args.epochs}"]
    if args.teacher_checkpoint is not None:
        common.append(f"teacher.checkpoint={args.teacher_checkpoint.resolve()}")
    try:
        teacher_recipe = load_recipe(None, [*common, "name=teacher"])
        search = search_student(
            teacher_recipe, names, batch=args.batch, out=runs_dir / "search.json", log=console.print
        )
        teacher_file = Path(search["teacher"]["checkpoint"]).resolve()
        rows = []
        for candidate in search["candidates"]:
            recipe = load_recipe(
                None,
                [
                    *common,
                    f"name={candidate['name'].replace(':', '-')}",
                    f"teacher.checkpoint={teacher_file}",
                    f"student.model={candidate['name']}",
                    "distill.method=kd",
                ],
            )
            console.print(f"distilling {candidate['name']} ({recipe.distill.train.epochs} epochs)")
            distill = compress(recipe, until="distill", log=lambda _: None)["distill"]
            rows.append(
                {
                    **candidate,
                    "distilled_accuracy": distill["val_accuracy_last"],
                    "distilled_accuracy_best": distill["val_accuracy_best"],
                    "epochs": recipe.distill.train.epochs,
                }
            )
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    accuracy = [row["distilled_accuracy"] for row in rows]
    correlations = {
        "diswot_score": _tau([-row["score"] for row in rows], accuracy),
        "semantic_only": _tau([-row["semantic"] for row in rows], accuracy),
        "relation_only": _tau([-row["relation"] for row in rows], accuracy),
        "params": _tau([row["params"] for row in rows], accuracy),
        "flops": _tau([row["flops"] for row in rows], accuracy),
    }
    where = f"{args.data} at {args.image_size}x{args.image_size}"
    table = Table(
        title=f"DisWOT ranking vs distilled accuracy · teacher {search['teacher']['model']} · {where}"
    )
    for column in (
        "DisWOT rank",
        "candidate",
        "score",
        "semantic",
        "relation",
        "last map",
        "params",
        "MFLOPs",
        "accuracy",
    ):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for row in rows:
        table.add_row(
            str(row["rank"]),
            row["name"],
            f"{row['score']:.4f}",
            f"{row['semantic']:.4f}",
            f"{row['relation']:.4f}",
            "x".join(map(str, row.get("map_shape") or [])) + (" (!)" if row.get("map_warning") else ""),
            f"{row['params'] / 1e6:.2f}M",
            f"{row['flops'] / 1e6:.1f}",
            f"{row['distilled_accuracy']:.4f}",
        )
    console.print(table)
    warned = [row["name"] for row in rows if row.get("map_warning")]
    if warned:
        console.print(f"(!) last map too small for a meaningful DisWOT score: {', '.join(warned)}")
    console.print(
        f"Kendall tau vs distilled accuracy ({len(rows)} candidates): "
        + " | ".join(
            f"{label} {correlations[key]['tau']} (p={correlations[key]['p_value']})"
            for key, label in (("diswot_score", "DisWOT score"), ("flops", "FLOPs"), ("params", "params"))
        )
    )
    for proxy in ("semantic_only", "relation_only"):
        value = correlations[proxy]
        console.print(f"Kendall tau ({proxy} vs distilled accuracy): {value['tau']} (p={value['p_value']})")
    teacher = {key: value for key, value in search.pop("teacher").items() if key != "checkpoint"}
    search.pop("out")
    search.pop("candidates")
    atomic.write_json(
        args.out,
        {
            "benchmark": "student_search",
            "environment": environment(),
            "task": {"data": args.data, "image_size": args.image_size, "overrides": task},
            "seed": args.seed,
            "overrides": args.overrides,
            "teacher": teacher,
            "search": search,
            "kendall_tau": correlations,
            "candidates": rows,
        },
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
