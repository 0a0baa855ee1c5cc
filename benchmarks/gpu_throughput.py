"""Teacher training and distillation on CUDA vs the CPU, on the default task: samples/s and accuracy.

The default radio recipe runs up to the distill stage twice in fresh run directories, once with
``distill.accelerator=cpu`` and once with ``distill.accelerator=cuda`` (the teacher is trained in
each run: ``teacher.checkpoint=null``, store off). Reported per accelerator and stage: the stage's wall
time from ``stage.json`` (dataset build, teacher-output cache and evaluation included), training
samples/s (train samples x epochs / wall time), held-out accuracy, and the device the stage
recorded. Small models on a small task leave a GPU mostly idle (per-step launch overhead dominates);
the numbers say what edgekd's stages gain on this task, not what the GPU can do on a large one.
Without a CUDA device only the CPU row is measured (and the JSON says so).

    python benchmarks/gpu_throughput.py [--epochs N] [--frames N] [--seed 0] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from edgekd import accelerator, atomic
from edgekd.api import compress
from edgekd.data import build_dataset
from edgekd.recipe import load_recipe

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_throughput.json"


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = [f"seed={args.seed}"]
    if args.frames is not None:
        extra.append(f"data.frames_per_class_snr={args.frames}")
    if args.epochs is not None:
        extra += [f"teacher.train.epochs={args.epochs}", f"distill.train.epochs={args.epochs}"]
    return extra


def _run(runs_dir: Path, device: str, args: argparse.Namespace, train_samples: int) -> dict:
    overrides = [f"runs_dir={runs_dir}", f"name={device}", f"distill.accelerator={device}"]
    overrides += ["teacher.store=false", "teacher.checkpoint=null", *_overrides(args)]
    start = time.perf_counter()
    compress(load_recipe(None, overrides), until="distill", log=lambda _: None)
    rows = {}
    for stage in ("teacher", "distill"):
        record = json.loads(next((runs_dir / device).glob(f"*-{stage}/stage.json")).read_text())
        out = record["outputs"]
        epochs = len(out["history"])
        rows[stage] = {
            "device": out["device"],
            "wall_s": record["wall_s"],
            "epochs": epochs,
            "samples_per_s": round(train_samples * epochs / record["wall_s"], 1),
            "val_accuracy": out.get("val_accuracy", out.get("val_accuracy_last")),
        }
    return {"accelerator": device, "end_to_end_s": round(time.perf_counter() - start, 2), "stages": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=None, help="both stages (default: the recipe's)")
    parser.add_argument("--frames", type=int, default=None, help="data.frames_per_class_snr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    recipe = load_recipe(None, _overrides(args))
    train_set, _, _ = build_dataset(recipe.data, seed=recipe.seed)
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    results = []
    with tempfile.TemporaryDirectory(prefix="edgekd-gpu-bench-") as scratch:
        for device in devices:
            row = _run(Path(scratch), device, args, len(train_set))
            results.append(row)
            cells = "  ".join(
                f"{stage}: {r['samples_per_s']} samples/s, acc {r['val_accuracy']}"
                for stage, r in row["stages"].items()
            )
            print(f"{row['stages']['distill']['device']}: {cells}  (end to end {row['end_to_end_s']} s)")
    if len(results) == 2:
        for stage, r in results[1]["stages"].items():
            r["speedup_vs_cpu"] = round(r["samples_per_s"] / results[0]["stages"][stage]["samples_per_s"], 2)
    payload = {
        "benchmark": "gpu_throughput",
        "command": "python benchmarks/gpu_throughput.py "
        + " ".join(f"--{k} {v}" for k, v in (("epochs", args.epochs), ("frames", args.frames)) if v)
        + f" --seed {args.seed}",
        "device": accelerator.describe(accelerator.training_device("auto")),
        "cpu_cores": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "train_samples": len(train_set),
        "teacher": recipe.teacher.model,
        "student": recipe.student.model,
        "method": recipe.distill.method,
        "results": results,
        "not_measured": None if len(results) == 2 else "CUDA: torch sees no CUDA device on this machine",
    }
    atomic.write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
