"""edgekd vs torchdistill: the same Hinton KD job trained by both, wall time and held-out accuracy.

For every seed, one teacher (edgekd:clst, trained once with edgekd on the labels) is distilled into
the same student (edgekd:kd-cnn, the same initial weights, saved once and loaded by both sides) on
the same data, in one run on this machine, five times in turn (never concurrently):

1. torchdistill live: torchdistill 1.1.5 (the newest release): its ``DistillationBox``
   (``get_distillation_box``) with its registered ``KDLoss`` inside a ``WeightedSumLoss``, AdamW and a
   per-iteration OneCycleLR built from its optimiser/scheduler registries, its data loaders over the
   in-memory frames; the teacher runs on every batch.
2. torchdistill, cold cache: the same job with torchdistill's own teacher-output cache on, starting
   empty. torchdistill 1.1.5 no longer has that cache (removed by its PR #539, "remove teacher I/O
   caching"), so this row and the next run torchdistill 1.1.4, the last release with it, otherwise
   identical in the distillation box (1.1.4 -> 1.1.5 changed only the cache code and formatting
   there). Its cache, as 1.1.4 implements it: the train data loader's ``cache_output: DIR`` wraps the
   dataset in ``CacheableDataset``, whose ``__getitem__`` gives every sample a file
   ``DIR/<last 4 digits>/<index, 4+ digits>.pt`` and ``torch.load``s it when it exists;
   ``DistillationBox.get_teacher_output`` uses the loaded outputs for a batch when they are there,
   and otherwise runs the teacher and ``torch.save``s one file per sample. So the cold run runs the
   teacher and writes a file per frame in epoch 1, then reads them back every later epoch.
3. torchdistill, warm cache: the same again, over the cache the cold run filled: no teacher call.
4. edgekd, cold: ``compress(until="distill")`` with ``distill.method=kd`` and the teacher checkpoint,
   with an empty teacher cache, so its time includes computing the teacher outputs from scratch;
5. edgekd, warm: the same run directory again with its distill stage removed, so the teacher
   stage is reused and the teacher cache written by the cold run is hit.

The headline is warm vs warm (torchdistill's cache filled / edgekd's cache filled): what each tool
costs per distillation once its teacher outputs exist. Every row counts its teacher forward calls
(live: every batch; cold: the batches of epoch 1 / one pass; warm: none) and the run fails if a
count is off.

torchdistill gets its own best settings within its features: its cache on ``/dev/shm`` (RAM-backed
tmpfs; ``--torchdistill-cache-dir`` to choose), and ``--torchdistill-workers`` data-loader worker
processes (persistent) for the cached rows, where ``__getitem__`` does a ``torch.load`` per frame; the
JSON records what was chosen and why.

Identical on both sides: epochs, batch size, the batch order of every epoch (edgekd's seeded
permutation, fed to torchdistill as its sampler), AdamW(lr, weight_decay), OneCycleLR(max_lr=lr,
total_steps=epochs x steps per epoch, pct_start=0.2) stepped every batch, the loss
``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE`` with T and alpha from the
recipe (torchdistill's KDLoss weighs CE by its ``alpha``, so it gets alpha=1-alpha, beta=alpha),
teacher in eval mode, CPU, torch intra-op threads, one held-out evaluation per epoch on the same
split. Wall time is distillation only: from frames in memory to the trained student saved
(edgekd: the distill stage's recorded wall time; torchdistill: the same span timed in the worker,
interpreter start and ``import torchdistill`` excluded). Before timing, each side runs the same
untimed warm-up (teacher forward, student forward + backward on throwaway models).

torchdistill is never a project dependency: each version is installed on first use into its own
``benchmarks/.envs/`` folder (one ``pip install --target --no-deps`` call, see side_env.py) and runs in
a subprocess on this same interpreter (same torch).

Prints a table and writes benchmarks/results/vs_torchdistill.json (or ``--out``).
    python benchmarks/vs_torchdistill.py [--seeds 3] [--epochs 15] [--teacher-epochs 15]
        [--frames-per-class-snr 40] [--threads N] [--torchdistill-workers N]
        [--torchdistill-cache-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from side_env import SideEnvironment  # benchmarks/ is on sys.path: the scripts run from there

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "vs_torchdistill.json"
# The live row runs the newest torchdistill; the cached rows the last release that has the cache.
TORCHDISTILL_LIVE = "1.1.5"
TORCHDISTILL_CACHE = "1.1.4"
SIDE_ENVS = {
    TORCHDISTILL_LIVE: SideEnvironment(HERE / ".envs" / "torchdistill"),
    TORCHDISTILL_CACHE: SideEnvironment(HERE / ".envs" / f"torchdistill-{TORCHDISTILL_CACHE}"),
}
# torchdistill 1.1.x declares pyyaml, scipy and cython besides torch / torchvision / numpy; its source
# imports yaml but neither scipy nor Cython, so only pyyaml is installed, and only when the .venv lacks
# it. torch / torchvision / numpy are never installed: the worker uses the .venv's.
LIGHT_REQUIREMENTS = (("pyyaml", "yaml"),)
NOT_INSTALLED = ("scipy (declared, not imported by torchdistill 1.1.x)", "cython (same)")
FORBIDDEN = ("torch", "torchvision", "numpy")
# torchdistill 1.1.4's default_idx2subpath: a sample's cache file sits in a folder named after the last
# four digits of its index
CACHE_FILE_GLOB = "*/*.pt"
# Data-loader workers for torchdistill's cached rows (its __getitem__ torch.loads one file per frame)
DEFAULT_CACHE_WORKERS = 2
CACHE_WORKERS_WHY = (
    "fastest of 0, 1 and 2 on the 2-core machine (warm cache, 3 epochs, 2 torch threads, two "
    "interleaved rounds: 0 workers 12.8 / 11.2 s, 1: 13.8 / 11.2 s, 2: 11.5 / 8.7 s): the per-frame "
    "torch.load (about 1.5-1.9 s per epoch of 6,600 frames in the main process) overlaps with training"
)


# --------------------------------------------------------------------------- torchdistill environment


def ensure_torchdistill(version: str) -> dict[str, Any]:
    """torchdistill ``version`` (and pyyaml if the .venv lacks it) in its own folder, one pip call."""
    missing = set(SideEnvironment.missing_from_base([module for _, module in LIGHT_REQUIREMENTS]))
    requirements = [f"torchdistill=={version}"]
    requirements += [dist for dist, module in LIGHT_REQUIREMENTS if module in missing]
    record = SIDE_ENVS[version].ensure(requirements, forbidden=FORBIDDEN)
    return {**record, "not_installed": list(NOT_INSTALLED)}


def cache_root(requested: Path | None) -> Path:
    """Where torchdistill's per-sample cache files go: ``requested``, else RAM-backed /dev/shm if usable."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="edgekd-vs-torchdistill-cache-", dir=requested))
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="edgekd-vs-torchdistill-cache-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="edgekd-vs-torchdistill-cache-"))


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts: the longest matching mount)."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        return kind
    resolved = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3 or len(fields[1]) <= len(best):
            continue
        if resolved == fields[1] or resolved.startswith(fields[1].rstrip("/") + "/"):
            best, kind = fields[1], fields[2]
    return kind


# --------------------------------------------------------------------------- shared warm-up


def warm_up(
    teacher_model: str, student_model: str, classes: int, channels: int, x: np.ndarray, batch: int
) -> None:
    """Untimed, identical on both sides: first calls of the teacher's and student's kernels.

    Throwaway models (fresh weights): the teacher forward at the batch sizes both sides use, one
    student forward + backward. Keeps one-off first-call costs (allocator, oneDNN primitive creation)
    out of both timings; without it the side that happens to run in a fresh process pays them alone.
    """
    from edgekd.models import build_model

    teacher = build_model(teacher_model, num_classes=classes, in_channels=channels).eval()
    student = build_model(student_model, num_classes=classes, in_channels=channels).train()
    with torch.no_grad():
        for size in (batch, 512):
            teacher(torch.from_numpy(x[:size]))
    student(torch.from_numpy(x[:batch])).sum().backward()


# --------------------------------------------------------------------------- torchdistill worker


class EpochOrderSampler(torch.utils.data.Sampler):
    """edgekd's batch order: epoch ``e`` visits ``np.random.default_rng([seed, e]).permutation(n)``.

    The epoch advances on every ``__iter__`` (one per epoch, as torchdistill's loop iterates the loader).
    """

    def __init__(self, data_source: Any, seed: int) -> None:
        self.n, self.seed, self.epoch = len(data_source), seed, 0

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        self.epoch += 1
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n


def torchdistill_worker(config_file: Path) -> None:
    """Distil with torchdistill's DistillationBox; writes the results JSON named in the config.

    With ``cache_dir`` in the config, the train loader gets torchdistill's ``cache_output`` (its
    per-sample teacher-output cache, torchdistill <= 1.1.4), with ``num_workers`` loader processes.
    """
    import torchdistill
    from torchdistill.core.distillation import get_distillation_box

    from edgekd.models import build_model
    from edgekd.models.checkpoint import load_weights

    cfg = json.loads(config_file.read_text(encoding="utf-8"))
    torch.set_num_threads(cfg["threads"])
    work = Path(cfg["work_dir"])
    x_train, y_train = np.load(work / "x_train.npy"), np.load(work / "y_train.npy")
    x_val, y_val = np.load(work / "x_val.npy"), np.load(work / "y_val.npy")
    device = torch.device("cpu")
    seed, epochs, batch_size = cfg["seed"], cfg["epochs"], cfg["batch_size"]
    cache_dir, workers = cfg["cache_dir"], cfg["num_workers"]
    warm_up(
        cfg["teacher_model"],
        cfg["student_model"],
        cfg["num_classes"],
        cfg["in_channels"],
        x_train,
        batch_size,
    )

    start = time.perf_counter()  # frames are in memory from here on
    teacher = build_model(cfg["teacher_model"], cfg["num_classes"], cfg["in_channels"])
    load_weights(teacher, cfg["teacher_file"], cfg["teacher_model"])
    teacher.eval()
    student = build_model(cfg["student_model"], cfg["num_classes"], cfg["in_channels"])
    load_weights(student, cfg["student_init_file"], cfg["student_model"])
    dataset_dict = {
        "train": torch.utils.data.TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        "val": torch.utils.data.TensorDataset(torch.from_numpy(x_val), torch.from_numpy(y_val)),
    }
    steps_per_epoch = -(-len(x_train) // batch_size)
    train_loader: dict[str, Any] = {
        "dataset_id": "train",
        "sampler": {"class_or_func": EpochOrderSampler, "kwargs": {"seed": seed}},
        "kwargs": {"batch_size": batch_size, "num_workers": workers, "drop_last": False}
        | ({"persistent_workers": True} if workers > 0 else {}),
    }
    if cache_dir is not None:
        train_loader["cache_output"] = cache_dir  # torchdistill <= 1.1.4: CacheableDataset over DIR
    train_config = {
        "num_epochs": epochs,
        "train_data_loader": train_loader,
        "val_data_loader": {
            "dataset_id": "val",
            "sampler": {"class_or_func": torch.utils.data.SequentialSampler, "kwargs": {}},
            "kwargs": {"batch_size": 512, "num_workers": 0},
        },
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "requires_grad": True},
        "optimizer": {
            "key": "AdamW",
            "kwargs": {"lr": cfg["lr"], "weight_decay": cfg["weight_decay"]},
        },
        "scheduler": {
            "key": "OneCycleLR",
            "kwargs": {"max_lr": cfg["lr"], "total_steps": epochs * steps_per_epoch, "pct_start": 0.2},
            "scheduling_step": 1,  # stepped after every batch, like edgekd
        },
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {
                "sub_terms": {
                    "kd": {
                        "criterion": {
                            "key": "KDLoss",
                            "kwargs": {
                                "student_module_path": ".",
                                "student_module_io": "output",
                                "teacher_module_path": ".",
                                "teacher_module_io": "output",
                                "temperature": cfg["temperature"],
                                # torchdistill: alpha * CE + beta * T^2 * KL
                                "alpha": 1.0 - cfg["alpha"],
                                "beta": cfg["alpha"],
                                "reduction": "batchmean",
                            },
                        },
                        "weight": 1.0,
                    }
                }
            },
        },
    }
    box = get_distillation_box(teacher, student, dataset_dict, train_config, device, None, False, 1)
    wrapper = type(box.train_data_loader.dataset).__name__
    if (cache_dir is not None) != (wrapper == "CacheableDataset"):
        raise RuntimeError(f"torchdistill wrapped the train set in {wrapper} (cache_dir={cache_dir})")
    teacher_calls = [0]  # teacher forward calls, counted where torchdistill calls it

    def count_teacher_call(*_: Any) -> None:
        teacher_calls[0] += 1

    counter = box.teacher_model.register_forward_pre_hook(count_teacher_call)
    if len(box.train_data_loader) != steps_per_epoch:
        raise RuntimeError(
            f"torchdistill loader has {len(box.train_data_loader)} batches, expected {steps_per_epoch}"
        )

    @torch.inference_mode()
    def evaluate() -> float:
        box.student_model.eval()
        correct = 0
        for x, y in box.val_data_loader:
            correct += int((box.student_model(x).argmax(1) == y).sum())
        return correct / len(box.val_data_loader.dataset)

    history = []
    setup_s = time.perf_counter() - start
    for epoch in range(box.num_epochs):
        epoch_start = time.perf_counter()
        torch.manual_seed(seed * 100_003 + epoch)  # as edgekd's trainer, per epoch
        box.pre_epoch_process(epoch=epoch)
        total, batches = 0.0, 0
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            total += float(loss.detach())
            batches += 1
        accuracy = evaluate()
        box.post_epoch_process()
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": round(total / batches, 5),
                "val_accuracy": round(accuracy, 5),
                "wall_s": round(time.perf_counter() - epoch_start, 3),
            }
        )
    teacher_stayed_eval = not box.teacher_model.training
    counter.remove()
    box.clean_modules()
    torch.save(student.state_dict(), work / "torchdistill_student.pt")
    wall_s = time.perf_counter() - start

    last_lr = box.optimizer.param_groups[0]["lr"]
    best = max(history, key=lambda row: row["val_accuracy"])
    result = {
        "wall_s": round(wall_s, 3),
        "setup_s": round(setup_s, 3),
        "val_accuracy_last": history[-1]["val_accuracy"],
        "val_accuracy_best": best["val_accuracy"],
        "best_epoch": best["epoch"],
        "history": history,
        "steps": box.lr_scheduler.last_epoch,
        "teacher_forward_batches": teacher_calls[0],
        "train_dataset_wrapper": wrapper,
        "cache_dir": cache_dir,
        "cache_files": len(list(Path(cache_dir).glob(CACHE_FILE_GLOB))) if cache_dir else 0,
        "num_workers": workers,
        "final_lr": last_lr,
        "criterion": str(box.criterion),
        "teacher_eval_mode": teacher_stayed_eval,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchdistill": torchdistill.__version__,
        "torchdistill_file": torchdistill.__file__,
    }
    Path(cfg["result_file"]).write_text(json.dumps(result, indent=2), encoding="utf-8")


# --------------------------------------------------------------------------- benchmark


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
    }


def _fmt(stat: dict[str, float], digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def run_torchdistill(
    mode: str,
    work: Path,
    seed: int,
    teacher_file: Path,
    init_file: Path,
    recipe: Any,
    meta: Any,
    threads: int,
    cache_dir: Path | None,
    workers: int,
) -> dict[str, Any]:
    """One torchdistill row (``mode``: live, cold or warm) in a worker process of its version's folder."""
    version = TORCHDISTILL_LIVE if mode == "live" else TORCHDISTILL_CACHE
    spec = recipe.distill.train
    config = {
        "mode": mode,
        "seed": seed,
        "epochs": spec.epochs,
        "batch_size": spec.batch_size,
        "lr": spec.lr,
        "weight_decay": spec.weight_decay,
        "temperature": recipe.distill.temperature,
        "alpha": recipe.distill.alpha,
        "threads": threads,
        "work_dir": str(work),
        "teacher_model": recipe.teacher.model,
        "teacher_file": str(teacher_file),
        "student_model": recipe.student.model,
        "student_init_file": str(init_file),
        "num_classes": len(meta.classes),
        "in_channels": meta.input_shape[0],
        "result_file": str(work / f"torchdistill_{mode}_result.json"),
        "cache_dir": None if cache_dir is None else str(cache_dir),
        "num_workers": workers,
    }
    config_file = work / f"torchdistill_{mode}_config.json"
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--torchdistill-worker", str(config_file)],
        check=True,
        env=SIDE_ENVS[version].env(),
    )
    result = json.loads(Path(config["result_file"]).read_text(encoding="utf-8"))
    result["process_wall_s"] = round(time.perf_counter() - start, 3)
    if result["torchdistill"] != version:
        raise RuntimeError(
            f"torchdistill {mode} row ran torchdistill {result['torchdistill']}, not {version}"
        )
    steps = -(-len(np.load(work / "y_train.npy", mmap_mode="r")) // spec.batch_size)
    expected = {"live": spec.epochs * steps, "cold": steps, "warm": 0}[mode]
    if result["teacher_forward_batches"] != expected:
        raise RuntimeError(
            f"torchdistill {mode}: the teacher ran on {result['teacher_forward_batches']} batches, "
            f"expected {expected}"
        )
    return result


def run_edgekd(
    runs_dir: Path, name: str, base: list[str], teacher_file: Path, init_file: Path
) -> dict[str, Any]:
    from edgekd.api import compress
    from edgekd.recipe import load_recipe

    recipe = load_recipe(
        None,
        [
            *base,
            f"runs_dir={runs_dir}",
            f"name={name}",
            "distill.method=kd",
            f"teacher.checkpoint={teacher_file}",
            f"student.checkpoint={init_file}",
        ],
    )
    start = time.perf_counter()
    out = compress(recipe, until="distill", log=lambda _: None)
    call_wall = time.perf_counter() - start
    record = json.loads(next(recipe.run_dir.glob("*-distill/stage.json")).read_text(encoding="utf-8"))
    distill = out["distill"]
    return {
        "wall_s": record["wall_s"],  # the distill stage alone (pipeline.run_stages' own timing)
        "call_wall_s": round(call_wall, 3),  # whole compress() call: + dataset build, teacher load, preflight
        "val_accuracy_last": distill["val_accuracy_last"],
        "val_accuracy_best": distill["val_accuracy_best"],
        "best_epoch": distill["best_epoch"],
        "teacher_cache": distill["teacher_cache"],
        "history": distill["history"],
    }


def benchmark_seed(
    root: Path, td_cache_root: Path, seed: int, args: argparse.Namespace, threads: int
) -> dict[str, Any]:
    from edgekd.api import compress
    from edgekd.console import console
    from edgekd.data import build_dataset
    from edgekd.models import build_model
    from edgekd.models.checkpoint import save_checkpoint
    from edgekd.recipe import load_recipe

    base = [f"seed={seed}", f"distill.train.epochs={args.epochs}"]
    if args.frames_per_class_snr is not None:
        base.append(f"data.frames_per_class_snr={args.frames_per_class_snr}")
    if args.teacher_epochs is not None:
        base.append(f"teacher.train.epochs={args.teacher_epochs}")
    runs_dir = root / f"seed-{seed}" / "runs"
    work = root / f"seed-{seed}" / "work"
    work.mkdir(parents=True)

    console.print(f"seed {seed} · teacher (edgekd, trained once, shared)")
    teacher_run = compress(
        load_recipe(None, [*base, f"runs_dir={runs_dir}", "name=teacher"]),
        until="teacher",
        log=lambda _: None,
    )
    teacher_file = runs_dir / "teacher" / teacher_run["teacher"]["model_file"]

    recipe = load_recipe(None, [*base, f"runs_dir={runs_dir}", "name=kd", "distill.method=kd"])
    train_set, val_set, meta = build_dataset(recipe.data, seed=seed)
    for name, array in (
        ("x_train", train_set.x),
        ("y_train", train_set.y),
        ("x_val", val_set.x),
        ("y_val", val_set.y),
    ):
        np.save(work / f"{name}.npy", array)
    torch.manual_seed(seed)  # the student's initial weights: one seeded draw, loaded by both sides
    init_file = work / "student_init.pt"
    student = build_model(
        recipe.student.model, num_classes=len(meta.classes), in_channels=meta.input_shape[0]
    )
    save_checkpoint(init_file, student, recipe.student.model)

    common = (work, seed, teacher_file, init_file, recipe, meta, threads)
    console.print(f"seed {seed} · torchdistill {TORCHDISTILL_LIVE}, teacher live (subprocess)")
    td_live = run_torchdistill("live", *common, None, 0)
    td_cache = td_cache_root / f"seed-{seed}"  # empty: the cold run fills it, the warm run reads it
    console.print(f"seed {seed} · torchdistill {TORCHDISTILL_CACHE}, its cache cold (subprocess)")
    td_cold = run_torchdistill("cold", *common, td_cache, args.torchdistill_workers)
    console.print(f"seed {seed} · torchdistill {TORCHDISTILL_CACHE}, its cache warm (subprocess)")
    td_warm = run_torchdistill("warm", *common, td_cache, args.torchdistill_workers)
    shutil.rmtree(td_cache, ignore_errors=True)
    for td in (td_live, td_cold, td_warm):
        if td["torch"] != torch.__version__:
            raise RuntimeError(
                f"torchdistill worker ran torch {td['torch']}, this process {torch.__version__}"
            )
    if td_cold["cache_files"] != len(train_set):
        raise RuntimeError(
            f"torchdistill's cold run wrote {td_cold['cache_files']} cache files for {len(train_set)} frames"
        )

    cache_dir = recipe.runs_dir.parent / "cache" / "teacher"  # edgekd's teacher cache for this runs_dir
    shutil.rmtree(cache_dir, ignore_errors=True)
    warm_up(
        recipe.teacher.model,
        recipe.student.model,
        len(meta.classes),
        meta.input_shape[0],
        train_set.x,
        recipe.distill.train.batch_size,
    )
    console.print(f"seed {seed} · edgekd, cold teacher cache")
    cold = run_edgekd(runs_dir, "kd", base, teacher_file, init_file)
    console.print(f"seed {seed} · edgekd, warm teacher cache")
    # Same run directory with its distill stage removed: the teacher stage is then reused as is, so
    # teacher.pt, whose sha256 keys the cache, is the same file.
    for stage_dir in (runs_dir / "kd").glob("*-distill"):
        shutil.rmtree(stage_dir)
    warm = run_edgekd(runs_dir, "kd", base, teacher_file, init_file)
    if cold["teacher_cache"]["hit"] or not warm["teacher_cache"]["hit"]:
        raise RuntimeError(
            f"teacher cache: cold hit={cold['teacher_cache']['hit']}, warm hit={warm['teacher_cache']['hit']}"
        )
    return {
        "seed": seed,
        "train_frames": len(train_set),
        "val_frames": len(val_set),
        "steps_per_epoch": -(-len(train_set) // recipe.distill.train.batch_size),
        "teacher_val_accuracy": teacher_run["teacher"]["val_accuracy"],
        "torchdistill_live": td_live,
        "torchdistill_cold": td_cold,
        "torchdistill_warm": td_warm,
        "edgekd_cold": cold,
        "edgekd_warm": warm,
    }


SIDES = {
    "torchdistill_live": f"torchdistill {TORCHDISTILL_LIVE}, teacher live",
    "torchdistill_cold": f"torchdistill {TORCHDISTILL_CACHE}, its cache cold",
    "torchdistill_warm": f"torchdistill {TORCHDISTILL_CACHE}, its cache warm",
    "edgekd_cold": "edgekd, cache cold",
    "edgekd_warm": "edgekd, cache warm",
}
HEADLINE = ("torchdistill_warm", "edgekd_warm")
EDGEKD_CALLS = {"edgekd_cold": "1 pass", "edgekd_warm": "0"}  # teacher runs: once to fill the cache, or none


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std of every row's wall time and accuracy, and of each row's wall time over edgekd's.

    ``ratios["<row>_over_<edgekd row>"]``: per seed, that row's wall time divided by the edgekd row's,
    then mean ± std over seeds. ``headline``: torchdistill warm over edgekd warm.
    """
    summary: dict[str, Any] = {}
    for key in SIDES:
        summary[key] = {
            "wall_s": _summary([r[key]["wall_s"] for r in runs]),
            "val_accuracy_last": _summary([r[key]["val_accuracy_last"] for r in runs]),
            "val_accuracy_best": _summary([r[key]["val_accuracy_best"] for r in runs]),
        }
    ratios = {
        f"{row}_over_{ek}": _summary([r[row]["wall_s"] / r[ek]["wall_s"] for r in runs])
        for row in SIDES
        for ek in ("edgekd_cold", "edgekd_warm")
        if row != ek
    }
    top, bottom = HEADLINE
    headline = {
        "what": f"{SIDES[top]} / {SIDES[bottom]}: wall time ratio per seed, mean ± std",
        **ratios[f"{top}_over_{bottom}"],
    }
    return {**summary, "ratios": ratios, "headline_warm_vs_warm": headline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="distillation epochs (default: the recipe's)"
    )
    parser.add_argument(
        "--teacher-epochs", type=int, default=None, help="teacher epochs (default: the recipe's)"
    )
    parser.add_argument("--frames-per-class-snr", type=int, default=None, help="smaller synthetic data set")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: all cores)"
    )
    parser.add_argument(
        "--torchdistill-workers",
        type=int,
        default=DEFAULT_CACHE_WORKERS,
        help="data-loader worker processes (persistent) for torchdistill's cached rows "
        f"(default {DEFAULT_CACHE_WORKERS}: {CACHE_WORKERS_WHY})",
    )
    parser.add_argument(
        "--torchdistill-cache-dir",
        type=Path,
        default=None,
        help="folder for torchdistill's per-sample cache files (default: /dev/shm, RAM-backed, if writable)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON to write")
    parser.add_argument("--torchdistill-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torchdistill_worker is not None:
        torchdistill_worker(args.torchdistill_worker)
        return

    from rich.table import Table

    from edgekd import atomic
    from edgekd.console import console
    from edgekd.recipe import load_recipe
    from edgekd.report.build import environment

    if args.seeds < 1 or args.torchdistill_workers < 0:
        parser.error("--seeds must be >= 1 and --torchdistill-workers >= 0")
    defaults = load_recipe(None)
    args.epochs = args.epochs or defaults.distill.train.epochs
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    env_info = {version: ensure_torchdistill(version) for version in SIDE_ENVS}

    root = Path(tempfile.mkdtemp(prefix="edgekd-vs-torchdistill-"))
    td_cache_root = cache_root(args.torchdistill_cache_dir)
    td_cache_fs = filesystem_of(td_cache_root)
    try:
        runs = [benchmark_seed(root, td_cache_root, seed, args, threads) for seed in range(args.seeds)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(td_cache_root, ignore_errors=True)

    summary = summarise(runs)
    ratios = summary["ratios"]
    table = Table(
        title=f"Hinton KD, {args.epochs} epochs, seeds 0..{args.seeds - 1}, {threads} threads (mean ± std)"
    )
    for column in (
        "trainer",
        "distill wall s",
        "this / edgekd warm",
        "teacher batches",
        "held-out acc (last)",
        "best epoch acc",
    ):
        table.add_column(column)
    for key, label in SIDES.items():
        ratio = "1" if key == "edgekd_warm" else _fmt(ratios[f"{key}_over_edgekd_warm"], 2)
        row = summary[key]
        calls = {r[key].get("teacher_forward_batches", "-") for r in runs}
        table.add_row(
            label,
            _fmt(row["wall_s"], 1),
            ratio,
            "/".join(str(c) for c in sorted(calls, key=str)) if "torchdistill" in key else EDGEKD_CALLS[key],
            _fmt(row["val_accuracy_last"]),
            _fmt(row["val_accuracy_best"]),
        )
    console.print(table)
    headline = summary["headline_warm_vs_warm"]
    console.print(f"headline, warm vs warm: {headline['what']} = {_fmt(headline, 2)}")
    teacher_acc = _summary([r["teacher_val_accuracy"] for r in runs])
    console.print(f"teacher (edgekd:clst) held-out accuracy {_fmt(teacher_acc)}")

    environment_info = environment()
    recipe = load_recipe(None)
    atomic.write_json(
        args.out,
        {
            "benchmark": "vs_torchdistill",
            "environment": {
                **environment_info,
                "threads": threads,
                "versions": {
                    "torch": torch.__version__,
                    "torchdistill_live": runs[0]["torchdistill_live"]["torchdistill"],
                    "torchdistill_cache": runs[0]["torchdistill_warm"]["torchdistill"],
                    "edgekd": metadata.version("edgekd"),
                },
                "torchdistill_envs": env_info,
            },
            "settings": {
                "seeds": list(range(args.seeds)),
                "epochs": args.epochs,
                "teacher_epochs": args.teacher_epochs or recipe.teacher.train.epochs,
                "frames_per_class_snr": args.frames_per_class_snr or recipe.data.frames_per_class_snr,
                "batch_size": recipe.distill.train.batch_size,
                "lr": recipe.distill.train.lr,
                "weight_decay": recipe.distill.train.weight_decay,
                "temperature": recipe.distill.temperature,
                "alpha": recipe.distill.alpha,
                "teacher": recipe.teacher.model,
                "student": recipe.student.model,
                "schedule": "AdamW + OneCycleLR(max_lr=lr, pct_start=0.2), stepped every batch",
                "torchdistill": {
                    "live": {
                        "version": TORCHDISTILL_LIVE,
                        "teacher": "runs on every batch (forward_batch_only, no_grad)",
                        "train_loader": "BaseDatasetWrapper over the in-memory TensorDataset, "
                        "num_workers 0 (nothing to load: a worker would only add IPC)",
                    },
                    "cache": {
                        "version": TORCHDISTILL_CACHE,
                        "why_this_version": f"torchdistill {TORCHDISTILL_LIVE} removed its teacher-output "
                        "cache (PR #539, 'remove teacher I/O caching'); 1.1.4 is the last release with it",
                        "mechanism": "train_data_loader.cache_output -> CacheableDataset: one torch.save'd "
                        "file per sample, DIR/<last 4 digits>/<index, 4+ digits>.pt, torch.load'ed in "
                        "__getitem__ when present; DistillationBox.get_teacher_output uses it, else runs "
                        "the teacher and writes the batch's files",
                        "cache_dir": str(td_cache_root),
                        "cache_filesystem": td_cache_fs,
                        "cache_dir_why": "RAM-backed tmpfs when /dev/shm is writable: the fastest local "
                        "place for its per-file reads and writes (--torchdistill-cache-dir to choose)",
                        "num_workers": args.torchdistill_workers,
                        "persistent_workers": args.torchdistill_workers > 0,
                        "num_workers_why": CACHE_WORKERS_WHY,
                        "cold": "cache folder empty at start: epoch 1 runs the teacher and writes every "
                        "file, later epochs read them",
                        "warm": "the folder the cold run filled: the teacher never runs",
                    },
                },
                "edgekd": {
                    "trainer": "edgekd.distill.trainer.train via compress(until='distill'), "
                    "distill.method=kd",
                    "teacher_cache": "logits of every train frame computed once per (teacher weights, data, "
                    "augmentation bank), memory-mapped from models/cache/teacher/ under the run's root",
                    "cold": "cache folder deleted first: the stage runs the teacher once over the train "
                    "split, writes the cache, then trains",
                    "warm": "the same run directory again, distill stage removed: the cache is hit",
                    "checkpoint": "latest.pt (model, optimiser, scheduler, history) written every epoch, "
                    "inside the timed span",
                },
            },
            "summary": {**summary, "teacher_val_accuracy": teacher_acc},
            "runs": runs,
        },
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
