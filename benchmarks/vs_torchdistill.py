"""edgekd vs torchdistill: the same Hinton KD job trained by both, wall time and held-out accuracy.

For every seed, one teacher (edgekd:clst, trained once with edgekd on the labels) is distilled into
the same student (edgekd:kd-cnn, the same initial weights, saved once and loaded by both sides) on
the same data, in one run on this machine, three times in turn (never concurrently):

1. torchdistill 1.1.5: its ``DistillationBox`` (``get_distillation_box``) with its registered
   ``KDLoss`` inside a ``WeightedSumLoss``, AdamW and a per-iteration OneCycleLR built from its
   optimiser/scheduler registries, its data loaders over the in-memory frames; the teacher runs live
   on every batch. It runs in a subprocess on this same interpreter (same torch), with torchdistill
   installed on first use into ``benchmarks/.envs/torchdistill`` (``pip install --target --no-deps``).
2. edgekd, cold: ``compress(until="distill")`` with ``distill.method=kd`` and the teacher checkpoint,
   with an empty teacher cache, so its time includes computing the teacher outputs from scratch;
3. edgekd, warm: the same run directory again with its distill stage removed, so the teacher
   stage is reused and the teacher cache written by the cold run is hit.

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

Prints a table and writes benchmarks/results/vs_torchdistill.json.
    python benchmarks/vs_torchdistill.py [--seeds 3] [--epochs 15] [--teacher-epochs 15]
        [--frames-per-class-snr 40] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
TORCHDISTILL_VERSION = "1.1.5"
TORCHDISTILL_ENV = HERE / ".envs" / "torchdistill"
SIDE_ENV = SideEnvironment(TORCHDISTILL_ENV)
# torchdistill's declared light requirements (distribution name, import name). Each is installed into
# TORCHDISTILL_ENV (with --no-deps) only when the .venv lacks it AND the installed torchdistill source
# actually imports it (1.1.5 declares scipy and cython but imports neither). torch / torchvision /
# numpy are never installed: the worker uses the .venv's.
LIGHT_REQUIREMENTS = (("pyyaml", "yaml"), ("scipy", "scipy"), ("cython", "Cython"))


# --------------------------------------------------------------------------- torchdistill environment


def ensure_torchdistill() -> dict[str, Any]:
    """Install torchdistill (and only the light requirements it imports and the .venv lacks) on first use."""
    dist_info = TORCHDISTILL_ENV / f"torchdistill-{TORCHDISTILL_VERSION}.dist-info"
    installed: list[str] = []
    if not dist_info.is_dir():
        SIDE_ENV.pip_install(f"torchdistill=={TORCHDISTILL_VERSION}")
        installed.append(f"torchdistill=={TORCHDISTILL_VERSION}")
    source = "\n".join(
        p.read_text(encoding="utf-8") for p in (TORCHDISTILL_ENV / "torchdistill").rglob("*.py")
    )
    skipped: list[str] = []
    for dist, module in LIGHT_REQUIREMENTS:
        if SIDE_ENV.importable(module):
            continue
        if re.search(rf"^\s*(import|from)\s+{module}\b", source, re.MULTILINE | re.IGNORECASE):
            SIDE_ENV.pip_install(dist)
            installed.append(dist)
        else:
            skipped.append(f"{dist} (declared, not imported by torchdistill {TORCHDISTILL_VERSION})")
    for forbidden in ("torch", "torchvision", "numpy"):
        if (TORCHDISTILL_ENV / forbidden).exists():
            raise RuntimeError(f"{TORCHDISTILL_ENV} holds its own {forbidden}; delete the folder and rerun")
    return {"path": str(TORCHDISTILL_ENV), "installed_now": installed, "not_installed": skipped}


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
    """Distil with torchdistill's DistillationBox; writes the results JSON named in the config."""
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
    train_config = {
        "num_epochs": epochs,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": EpochOrderSampler, "kwargs": {"seed": seed}},
            "kwargs": {"batch_size": batch_size, "num_workers": 0, "drop_last": False},
        },
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
    work: Path, seed: int, teacher_file: Path, init_file: Path, recipe: Any, meta: Any, threads: int
) -> dict[str, Any]:
    spec = recipe.distill.train
    config = {
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
        "result_file": str(work / "torchdistill_result.json"),
    }
    config_file = work / "torchdistill_config.json"
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--torchdistill-worker", str(config_file)],
        check=True,
        env=SIDE_ENV.env(),
    )
    result = json.loads((work / "torchdistill_result.json").read_text(encoding="utf-8"))
    result["process_wall_s"] = round(time.perf_counter() - start, 3)
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


def benchmark_seed(root: Path, seed: int, args: argparse.Namespace, threads: int) -> dict[str, Any]:
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

    console.print(f"seed {seed} · torchdistill {TORCHDISTILL_VERSION} (subprocess)")
    td = run_torchdistill(work, seed, teacher_file, init_file, recipe, meta, threads)
    if td["torch"] != torch.__version__:
        raise RuntimeError(f"torchdistill worker ran torch {td['torch']}, this process {torch.__version__}")

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
    # teacher.pt, whose sha256 keys the cache, is byte-identical. A fresh run directory would not hit:
    # the teacher stage re-saves teacher.pt and torch.save's bytes depend on the (random) temporary
    # file name edgekd.atomic writes through, so the key changes on every re-save.
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
        "torchdistill": td,
        "edgekd_cold": cold,
        "edgekd_warm": warm,
    }


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

    defaults = load_recipe(None)
    args.epochs = args.epochs or defaults.distill.train.epochs
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    env_info = ensure_torchdistill()

    root = Path(tempfile.mkdtemp(prefix="edgekd-vs-torchdistill-"))
    try:
        runs = [benchmark_seed(root, seed, args, threads) for seed in range(args.seeds)]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    sides = {
        "torchdistill": "torchdistill",
        "edgekd_cold": "edgekd (cold cache)",
        "edgekd_warm": "edgekd (warm cache)",
    }
    summary: dict[str, Any] = {}
    for key in sides:
        summary[key] = {
            "wall_s": _summary([r[key]["wall_s"] for r in runs]),
            "val_accuracy_last": _summary([r[key]["val_accuracy_last"] for r in runs]),
            "val_accuracy_best": _summary([r[key]["val_accuracy_best"] for r in runs]),
        }
    ratios = {
        f"torchdistill_over_{key}": _summary([r["torchdistill"]["wall_s"] / r[key]["wall_s"] for r in runs])
        for key in ("edgekd_cold", "edgekd_warm")
    }

    table = Table(
        title=f"Hinton KD, {args.epochs} epochs, seeds 0..{args.seeds - 1}, {threads} threads (mean ± std)"
    )
    for column in (
        "trainer",
        "distill wall s",
        "torchdistill / this",
        "held-out acc (last)",
        "best epoch acc",
    ):
        table.add_column(column)
    for key, label in sides.items():
        ratio = "1" if key == "torchdistill" else _fmt(ratios[f"torchdistill_over_{key}"], 2)
        row = summary[key]
        table.add_row(
            label,
            _fmt(row["wall_s"], 1),
            ratio,
            _fmt(row["val_accuracy_last"]),
            _fmt(row["val_accuracy_best"]),
        )
    console.print(table)
    teacher_acc = _summary([r["teacher_val_accuracy"] for r in runs])
    console.print(f"teacher (edgekd:clst) held-out accuracy {_fmt(teacher_acc)}")

    environment_info = environment()
    recipe = load_recipe(None)
    atomic.write_json(
        RESULTS,
        {
            "benchmark": "vs_torchdistill",
            "environment": {
                **environment_info,
                "threads": threads,
                "versions": {
                    "torch": torch.__version__,
                    "torchdistill": runs[0]["torchdistill"]["torchdistill"],
                    "edgekd": metadata.version("edgekd"),
                },
                "torchdistill_env": env_info,
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
            },
            "summary": {**summary, "ratios": ratios, "teacher_val_accuracy": teacher_acc},
            "runs": runs,
        },
    )
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
