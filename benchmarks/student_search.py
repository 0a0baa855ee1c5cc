"""Does the DisWOT ranking predict which student distils best? Kendall tau against real distillation.

On the digits task (scikit-learn's handwritten digits at 32x32), one teacher (timm:resnet18, trained
once on the labels with the recipe's teacher training, or --teacher-checkpoint) is used throughout:

1. ``edgekd search-student``'s library call ranks the candidate students by their DisWOT score
   (random initialisation, one seeded batch of --batch train images, no training; lower = better);
2. every candidate is then distilled from that same teacher checkpoint with edgekd (method ``kd``,
   the recipe's epochs or --epochs, same seed) and scored on the held-out split (last epoch, the
   deployed model; the best epoch is recorded too).

Reported: Kendall's tau between -score (so that +1 means the DisWOT order is the accuracy order) and
the distilled accuracy, with its p-value; for reference the same tau for two trivial proxies, the
parameter count and the FLOPs (bigger = better), and for the semantic and relation terms alone.

Prints a table and writes benchmarks/results/student_search.json.
    python benchmarks/student_search.py [--candidates timm:a timm:b ...] [--epochs 15] [--seed 0]
        [--teacher-checkpoint FILE] [--batch 64]
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
TASK = ["data.name=digits", "teacher.model=timm:resnet18"]
CANDIDATES = [
    "timm:mobilenetv3_small_050",
    "timm:mobilenetv3_small_100",
    "timm:mobilenetv2_050",
    "timm:ghostnet_050",
    "timm:resnet10t",
    "timm:efficientnet_b0",
]


def _tau(proxy: list[float], accuracy: list[float]) -> dict[str, float | None]:
    """Kendall's tau-b of ``proxy`` (higher = predicted better) against ``accuracy``, with its p-value."""
    if len(proxy) < 2:
        return {"tau": None, "p_value": None}
    result = kendalltau(proxy, accuracy)
    return {"tau": round(float(result.statistic), 4), "p_value": round(float(result.pvalue), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES)
    parser.add_argument("--epochs", type=int, default=None, help="distillation (and teacher) epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64, help="DisWOT scoring batch")
    parser.add_argument("--teacher-checkpoint", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    args = parser.parse_args()
    names = check_candidates(args.candidates)
    runs_dir = Path(tempfile.mkdtemp(prefix="edgekd-student-search-"))
    common = [*TASK, f"runs_dir={runs_dir}", f"seed={args.seed}", *args.overrides]
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
    table = Table(
        title=f"DisWOT ranking vs distilled accuracy · teacher {search['teacher']['model']} · digits"
    )
    for column in (
        "DisWOT rank",
        "candidate",
        "score",
        "semantic",
        "relation",
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
            f"{row['params'] / 1e6:.2f}M",
            f"{row['flops'] / 1e6:.1f}",
            f"{row['distilled_accuracy']:.4f}",
        )
    console.print(table)
    for proxy, value in correlations.items():
        console.print(f"Kendall tau ({proxy} vs distilled accuracy): {value['tau']} (p={value['p_value']})")
    teacher = {key: value for key, value in search.pop("teacher").items() if key != "checkpoint"}
    search.pop("out")
    search.pop("candidates")
    atomic.write_json(
        RESULTS,
        {
            "benchmark": "student_search",
            "environment": environment(),
            "seed": args.seed,
            "overrides": args.overrides,
            "teacher": teacher,
            "search": search,
            "kendall_tau": correlations,
            "candidates": rows,
        },
    )
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
