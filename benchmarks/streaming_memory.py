"""Resident memory of a training stage on image folders of growing size: streamed vs in memory.

For each size N (default 5k, 50k, 200k images) this script writes a generated ImageFolder of N small
PNGs (``--classes`` class folders; each image a seeded pattern of its class's colour plus noise; the
folders are cached under ``--cache-dir`` and reused), then runs edgekd's teacher stage (one epoch of
a small timm model trained on the labels through edgekd's trainer, the same loop the distill stage
uses) once with ``data.stream=false`` (every image decoded into memory) and once with
``data.stream=true`` (paths in memory, images decoded per batch in ``data.workers`` DataLoader
worker processes), each in a child process of its own, so the peaks do not mix.

Reported per row: the child's peak resident memory (``VmHWM`` from /proc, the training process
alone), the peak of the summed proportional set size (PSS, /proc/PID/smaps_rollup: a page shared by
k processes counts 1/k in each, so the forked workers' shared libraries are not counted twice) of the
child and its DataLoader workers, sampled every 0.1 s,
the decoded size of the train split, and training samples/s (train images x epochs / the stage's
wall time from its ``stage.json``: dataset build, i.e. reading and hashing every file, and
evaluation included). An in-memory row that would not fit in the memory available fails with
edgekd's one-line DataError; the row records it.

    python benchmarks/streaming_memory.py [--sizes 5000 50000 200000] [--cache-dir DIR] [--workers 2]

Smoke test: ``--sizes 300 600``. Results: benchmarks/results/streaming_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "streaming_memory.json"
MARKER = "streaming_memory.json"  # written last into a generated folder: it is complete


def generate_folder(root: Path, images: int, classes: int, side: int, seed: int) -> Path:
    """``root/c<k>/<i>.png`` for ``images`` images spread evenly over ``classes``; reused when complete."""
    from PIL import Image

    settings = {"images": images, "classes": classes, "side": side, "seed": seed}
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(classes, 3))
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        k = i % classes
        noise = rng.integers(-60, 61, size=(side, side, 3))
        pixels = np.clip(colours[k] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"c{k}" / f"{i}.png")
    marker.write_text(json.dumps(settings))
    return root


def _child(args: argparse.Namespace) -> None:
    """One training run in this process; its result as JSON on the last stdout line."""
    from edgekd.api import compress
    from edgekd.errors import EdgekdError
    from edgekd.recipe import load_recipe

    runs = Path(tempfile.mkdtemp(prefix="edgekd-streaming-runs-"))
    overrides = [
        f"runs_dir={runs}",
        "name=streaming",
        "data.name=imagefolder",
        f"data.path={args.folder}",
        f"data.image_size={args.image_size}",
        f"data.stream={str(args.stream).lower()}",
        f"data.workers={args.workers}",
        f"teacher.model={args.model}",
        "teacher.checkpoint=null",
        "teacher.store=false",
        f"teacher.train.epochs={args.epochs}",
        f"teacher.train.batch_size={args.batch_size}",
    ]
    row: dict = {}
    try:
        compress(load_recipe(None, overrides), until="teacher", log=lambda _: None)
        record = json.loads(next(runs.glob("streaming/*-teacher/stage.json")).read_text())
        row["stage_wall_s"] = record["wall_s"]
        row["val_accuracy"] = record["outputs"].get("val_accuracy")
    except EdgekdError as exc:
        row["error"] = str(exc)
    status = Path("/proc/self/status").read_text()
    row["vmhwm_mib"] = round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)
    print(json.dumps(row))


def _tree_pss(pid: int) -> int:
    """Summed PSS (bytes) of ``pid`` and its descendants; 0 for processes gone meanwhile."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
            total += int(rollup.split("\nPss:")[1].split()[0]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total


def _run_child(folder: Path, stream: bool, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "--child", "--folder", str(folder), "--stream", str(stream).lower(),
        "--workers", str(args.workers), "--model", args.model, "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
    ]  # fmt: skip
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        peak = max(peak, _tree_pss(child.pid))
        time.sleep(0.1)
    out, err = child.communicate()
    wall = time.perf_counter() - started
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        return {"error": (err.strip().splitlines() or ["no output"])[-1], "wall_s": round(wall, 2)}
    row = json.loads(lines[-1])
    row["tree_peak_pss_mib"] = round(peak / 2**20, 1)
    row["process_wall_s"] = round(wall, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000, 200000])
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "edgekd-streaming")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--side", type=int, default=32, help="side in pixels of the generated PNGs")
    parser.add_argument("--image-size", type=int, default=32, help="data.image_size")
    parser.add_argument("--workers", type=int, default=2, help="data.workers of the streamed runs")
    parser.add_argument(
        "--model", default="timm:mobilenetv3_small_050", help="teacher.model (trained 1 epoch)"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", choices=["memory", "streamed"], default=["memory", "streamed"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    # child-process arguments
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stream", choices=["true", "false"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.stream = args.stream == "true"
        _child(args)
        return

    from rich.console import Console
    from rich.table import Table

    from edgekd import atomic
    from edgekd.data.base import available_memory

    val_fraction = 0.25  # the recipe default: the flat layout is split here
    rows = []
    for size in args.sizes:
        started = time.perf_counter()
        folder = generate_folder(
            args.cache_dir / f"folder-{size}-{args.classes}c-{args.side}px",
            size,
            args.classes,
            args.side,
            args.seed,
        )
        generate_s = time.perf_counter() - started
        train_images = round(size * (1 - val_fraction))
        for mode in args.modes:
            row = _run_child(folder, mode == "streamed", args)
            if "stage_wall_s" in row:
                row["samples_per_s"] = round(train_images * args.epochs / row["stage_wall_s"], 1)
            settings = {
                "images": size,
                "train_images": train_images,
                "classes": args.classes,
                "png_side": args.side,
                "data.image_size": args.image_size,
                "data.stream": mode == "streamed",
                "data.workers": args.workers if mode == "streamed" else 0,
                "teacher.model": args.model,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "seed": args.seed,
            }
            decoded = train_images * 3 * args.image_size**2 * 4
            rows.append(
                {
                    "mode": mode,
                    "settings": settings,
                    "decoded_train_mib": round(decoded / 2**20, 1),
                    "folder_generate_s": round(generate_s, 1),
                    **row,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    import torch

    result = {
        "benchmark": "streaming_memory",
        "what": "edgekd teacher stage (1 epoch through edgekd's trainer) on generated ImageFolders: "
        "peak RSS and samples/s, data.stream=false (decoded in memory) vs true (DataLoader workers)",
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "available_memory_mib": round((available_memory() or 0) / 2**20),
            "device": "cpu",
        },
        "rows": rows,
    }
    atomic.write_json(args.out, result)
    table = Table(title="Teacher stage, 1 epoch: streamed vs in-memory ImageFolder")
    for column in (
        "images",
        "mode",
        "decoded train MiB",
        "VmHWM MiB",
        "tree peak PSS MiB",
        "samples/s",
        "val acc",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            f"{row['settings']['images']:,}",
            row["mode"] + (f"/{row['settings']['data.workers']}w" if row["mode"] == "streamed" else ""),
            f"{row['decoded_train_mib']:,}",
            str(row.get("vmhwm_mib", "-")),
            str(row.get("tree_peak_pss_mib", "-")),
            str(row.get("samples_per_s", row.get("error", "-"))),
            str(row.get("val_accuracy", "-")),
        )
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
