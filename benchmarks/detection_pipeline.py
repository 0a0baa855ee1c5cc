"""Detection pipeline benchmark: the default detection run end to end, timed per stage, with every mAP.

`edgekd compress --data scenes --target x86-openvino` (recipes/detection.yaml: the shipped DETR
teacher, the student distilled with CLoCKDistill, OpenVINO FP16 and INT8 with the DETR rule set and
naive INT8 beside it) from an empty run directory and an empty data directory (so the scenes are
generated here too): wall time of each stage and of the whole run; held-out mAP@[.5:.95] and mAP@.5 and
p50 latency of the teacher, the PyTorch student and every compiled artifact; the deployed artifact.

Run it alone on the machine (its wall times are the README's "how long the default run takes").

    python benchmarks/detection_pipeline.py [--target x86-openvino] [--set FIELD=VALUE ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from rich.table import Table

from edgekd import atomic
from edgekd.api import compress
from edgekd.console import console
from edgekd.recipe import load_recipe
from edgekd.report.build import environment

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "detection.yaml"
RESULTS = HERE / "results" / "detection_pipeline.json"


def run(target: str, overrides: list[str]) -> dict:
    """The default detection run from scratch in a temporary folder; its timings and scores."""
    root = Path(tempfile.mkdtemp(prefix="edgekd-detection-pipeline-"))
    try:
        recipe = load_recipe(RECIPE, [*overrides, f"runs_dir={root / 'runs'}", f"target={target}"])
        start = time.perf_counter()
        report = compress(recipe, log=lambda _: None)
        total = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [
        {
            "name": row["name"],
            "role": row["role"],
            "precision": row.get("precision"),
            "map": row["accuracy"].get("map"),
            "map50": row["accuracy"].get("map50"),
            "p50_ms": (row.get("latency") or {}).get("p50_ms"),
        }
        for row in report["rows"]
    ]
    return {
        "recipe": str(RECIPE.relative_to(HERE.parent)),
        "target": target,
        "overrides": overrides,
        "teacher_checkpoint": str(recipe.teacher.checkpoint),
        "total_wall_s": round(total, 1),
        "stage_wall_s": {name: stage["wall_s"] for name, stage in report["stages"].items()},
        "rows": rows,
        "deployed": report["headline"].get("deployed"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="x86-openvino")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.target, args.overrides)
    stages = Table(title=f"default detection run on {args.target}: {result['total_wall_s']:.0f} s end to end")
    for column in ("stage", "wall s"):
        stages.add_column(column)
    for name, wall in result["stage_wall_s"].items():
        stages.add_row(name, f"{wall:.1f}")
    console.print(stages)
    scores = Table(title=f"held-out mAP and p50 latency (deployed: {result['deployed']})")
    for column in ("row", "mAP@[.5:.95]", "mAP@.5", "p50 ms"):
        scores.add_column(column)
    for row in result["rows"]:
        p50 = "" if row["p50_ms"] is None else f"{row['p50_ms']:.2f}"
        scores.add_row(row["name"], f"{row['map']:.4f}", f"{row['map50']:.4f}", p50)
    console.print(scores)
    atomic.write_json(args.out, {"benchmark": "detection_pipeline", **result, "environment": environment()})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
