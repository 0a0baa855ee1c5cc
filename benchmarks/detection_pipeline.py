"""Detection pipeline benchmark: the default detection run end to end, timed per stage, with every mAP.

`edgekd compress --data scenes --target x86-openvino` (recipes/detection.yaml: the shipped DETR
teacher, the student distilled with CLoCKDistill, OpenVINO FP16 and INT8 with the DETR rule set and
naive INT8 beside it) from an empty run directory and an empty data directory (so the scenes are
generated here too): wall time of each stage and of the whole run; held-out mAP@[.5:.95] and mAP@.5 and
p50 latency of the teacher, the PyTorch student and every compiled artifact (INT8 rows: the naive
full-INT8 model's too); the deployed artifact. Each further ``--targets`` entry then compiles the same
student for that target in the same run folder (teacher, distillation and export reused), so the
backends' INT8 and FP32 rows compare one student.

Run it alone on the machine (its wall times are the README's "how long the default run takes").

    python benchmarks/detection_pipeline.py [--targets x86-openvino x86-ort] [--set FIELD=VALUE ...]
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


def _rows(report: dict) -> list[dict]:
    rows = []
    for row in report["rows"]:
        naive = row.get("naive_int8")
        rows.append(
            {
                "name": row["name"],
                "role": row["role"],
                "precision": row.get("precision"),
                "map": row["accuracy"].get("map"),
                "map50": row["accuracy"].get("map50"),
                "p50_ms": (row.get("latency") or {}).get("p50_ms"),
                **({"naive_int8": {k: naive[k] for k in ("map", "map50", "p50_ms")}} if naive else {}),
            }
        )
    return rows


def run(targets: list[str], overrides: list[str]) -> list[dict]:
    """The default detection run from scratch in a temporary folder for ``targets[0]``, then each further
    target in the same folder; per target its timings and scores."""
    root = Path(tempfile.mkdtemp(prefix="edgekd-detection-pipeline-"))
    results = []
    try:
        for target in targets:
            recipe = load_recipe(RECIPE, [*overrides, f"runs_dir={root / 'runs'}", f"target={target}"])
            start = time.perf_counter()
            report = compress(recipe, log=lambda _: None)
            total = time.perf_counter() - start
            stages = report["stages"].items()
            ran = {name: stage["wall_s"] for name, stage in stages if not stage.get("cached")}
            results.append(
                {
                    "recipe": str(RECIPE.relative_to(HERE.parent)),
                    "target": target,
                    "from_scratch": not results,
                    "overrides": overrides,
                    "teacher_checkpoint": str(recipe.teacher.checkpoint),
                    "total_wall_s": round(total, 1),
                    "stage_wall_s": ran,
                    "rows": _rows(report),
                    "deployed": report["headline"].get("deployed"),
                }
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["x86-openvino", "x86-ort"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = run(args.targets, args.overrides)
    for result in results:
        how = "from scratch" if result["from_scratch"] else "added to the same run (stages that ran)"
        stages = Table(title=f"detection run on {result['target']}, {how}: {result['total_wall_s']:.0f} s")
        for column in ("stage", "wall s"):
            stages.add_column(column)
        for name, wall in result["stage_wall_s"].items():
            stages.add_row(name, f"{wall:.1f}")
        console.print(stages)
        scores = Table(title=f"held-out mAP and p50 latency (deployed: {result['deployed']})")
        for column in ("row", "mAP@[.5:.95]", "mAP@.5", "p50 ms", "naive INT8 mAP", "naive INT8 p50 ms"):
            scores.add_column(column)
        for row in result["rows"]:
            p50 = "" if row["p50_ms"] is None else f"{row['p50_ms']:.2f}"
            naive = row.get("naive_int8")
            scores.add_row(
                row["name"], f"{row['map']:.4f}", f"{row['map50']:.4f}", p50,
                f"{naive['map']:.4f}" if naive else "", f"{naive['p50_ms']:.2f}" if naive else "",
            )  # fmt: skip
        console.print(scores)
    first, more = results[0], results[1:]
    out = {"benchmark": "detection_pipeline", **first, "more_targets": more, "environment": environment()}
    atomic.write_json(args.out, out)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
