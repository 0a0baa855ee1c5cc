"""Teacher and distill stages on 1 vs N processes (torch.distributed, DDP): samples/s and accuracy.

For each process count N the default radio recipe runs up to the distill stage with
``distill.world_size = N`` (``edgekd compress --nproc N``) in a fresh run directory, with the teacher
store off so the teacher trains in every run. Reported per N and stage: the stage's wall time as
rank 0 records it in ``stage.json`` (the training stage alone: dataset build, teacher-output cache
and evaluation included, torchrun's start-up not), training samples/s (fit samples x epochs / wall
time), the held-out accuracy of the stage's model, and the end-to-end wall time of the whole call
(torchrun and its workers' start-up included). ``train.batch_size`` stays the global batch, so the
runs take the same optimisation steps; their accuracies differ only by BatchNorm over B/N samples per
rank, dropout masks and the padded samples (see edgekd/distributed.py).

Be honest about what this machine shows: on 2 CPU cores, 2 processes of 1 intra-op thread each
compete with the 1-process run's 2 threads for the same cores, so the speed-up measures how well
gloo's gradient all-reduce overlaps with CPU kernels, not what several GPUs or nodes would give.
On a CUDA machine (``distill.accelerator: auto`` resolves to CUDA) every process trains on its own
GPU (``cuda:LOCAL_RANK``) over NCCL; the JSON names the device (GPU model and count) and the
backend. ``--accelerator cpu`` measures gloo on the CPU there too; N may not exceed the GPU count.

    python benchmarks/ddp_scaling.py [--nprocs 1 2] [--epochs 4] [--frames 40] [--seed 0]
        [--accelerator auto|cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from edgekd import accelerator, atomic
from edgekd.api import compress
from edgekd.distributed import backend
from edgekd.recipe import load_recipe

RESULTS = Path(__file__).resolve().parent / "results" / "ddp_scaling.json"


def _run(runs_dir: Path, nproc: int, args: argparse.Namespace) -> dict:
    overrides = [
        f"runs_dir={runs_dir}",
        f"name=ddp{nproc}",
        f"seed={args.seed}",
        f"data.frames_per_class_snr={args.frames}",
        f"teacher.train.epochs={args.epochs}",
        f"distill.train.epochs={args.epochs}",
        f"distill.world_size={nproc}",
        f"distill.accelerator={args.accelerator}",
        "teacher.store=false",
        "teacher.checkpoint=null",
    ]
    recipe = load_recipe(None, overrides)
    start = time.perf_counter()
    compress(recipe, until="distill", log=lambda _: None)
    end_to_end = time.perf_counter() - start
    rows = {}
    for stage in ("teacher", "distill"):
        record = json.loads(next((runs_dir / f"ddp{nproc}").glob(f"*-{stage}/stage.json")).read_text())
        out = record["outputs"]
        epochs = len(out["history"])
        rows[stage] = {
            "wall_s": record["wall_s"],
            "epochs": epochs,
            # teacher training and skd fit on the whole train split
            "samples_per_s": round(args.train_samples * epochs / record["wall_s"], 1),
            "val_accuracy": out.get("val_accuracy", out.get("val_accuracy_last")),
            "device": out.get("device"),  # what rank 0 trained on, as the stage recorded it
        }
    return {"nproc": nproc, "end_to_end_s": round(end_to_end, 2), "stages": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--frames", type=int, default=40, help="data.frames_per_class_snr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", choices=accelerator.ACCELERATORS, default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    recipe = load_recipe(None, [f"data.frames_per_class_snr={args.frames}", f"seed={args.seed}"])
    from edgekd.data import build_dataset

    train_set, _, _ = build_dataset(recipe.data, seed=recipe.seed)
    args.train_samples = len(train_set)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgekd-ddp-bench-") as scratch:
        for nproc in args.nprocs:
            row = _run(Path(scratch), nproc, args)
            results.append(row)
            cells = "  ".join(
                f"{stage}: {r['samples_per_s']} samples/s, acc {r['val_accuracy']}"
                for stage, r in row["stages"].items()
            )
            print(f"{nproc} process(es): {cells}  (end to end {row['end_to_end_s']} s)")
    base = {stage: r["samples_per_s"] for stage, r in results[0]["stages"].items()}
    for row in results:
        for stage, r in row["stages"].items():
            r["speedup_vs_first"] = round(r["samples_per_s"] / base[stage], 3)
    import torch

    device = accelerator.training_device(args.accelerator)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    payload = {
        "benchmark": "ddp_scaling",
        "command": "python benchmarks/ddp_scaling.py "
        + f"--nprocs {' '.join(map(str, args.nprocs))} --epochs {args.epochs} --frames {args.frames} "
        + f"--seed {args.seed} --accelerator {args.accelerator}",
        "device": accelerator.describe(device) + (f", {gpus} GPU(s) on this machine" if gpus else ""),
        "accelerator": args.accelerator,
        "backend": backend(device),
        "cpu_cores": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "omp_num_threads": os.environ.get(
            "OMP_NUM_THREADS", "unset (1 process: all free cores; torchrun's workers: 1 each)"
        ),
        "train_samples": args.train_samples,
        "global_batch": recipe.distill.train.batch_size,
        "results": results,
        "not_measured": "several nodes: one machine here"
        + ("" if device.type == "cuda" else "; CUDA/NCCL: no GPU on this machine (or --accelerator cpu)"),
    }
    atomic.write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
