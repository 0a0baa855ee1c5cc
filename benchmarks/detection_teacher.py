"""Train the built-in detection task's shipped DETR teacher (``builtin:detr-r18-scenes``).

On two CPU cores a DETR teacher trained inside the default run's budget (6 epochs) is no stronger than
the student it should teach (benchmarks/results/detr_kd.json of session 8: teacher 1.5 mAP, student alone
5.6). A real teacher is trained once, longer and on more data, then distilled from many times; the
built-in radio task ships its teacher the same way (benchmarks/default_teacher.py). This script trains
``--model`` (default ``edgekd:detr-r18`` at ``--lr`` 3e-4, the pair that learns fastest here:
edgekd.tasks) through edgekd's own teacher stage (DETR's set loss, the recipe's detection optimiser)
on built-in scenes that share no scene with a user run's data (generated with seed
``TEACHER_DATA_SEED`` = 2**32 - 1, as the radio teacher's frames), and ships it as
``edgekd/teachers/<model>-scenes.safetensors`` (float16: half the file; loading casts it back to
float32) with its provenance (and its held-out mAP after every epoch) in ``.json`` beside it. A recipe
on the built-in scenes with that teacher model then takes it as its teacher
(:meth:`edgekd.recipe.Recipe._default_teacher_for_its_task_only`); it is then scored on the default
task's held-out scenes (the default recipe's seed) into its JSON.

Training is the stage's schedule (lr tenfold lower for the last fifth), optionally followed by a second
cycle: ``--epochs`` in the teacher stage, then ``--more-epochs`` from its weights through the same loop
(:func:`edgekd.detection.train.train_detector`, a fresh optimiser: a warm restart, Loshchilov & Hutter,
SGDR, ICLR 2017). The restart is ours: it lets a second session continue a teacher the first one
trained (``--from FILE`` skips the first cycle) instead of training it again from random weights. The
shipped ``detr-r18-scenes`` is the defaults (18 epochs, one cycle; 28 min on two CPU cores); the earlier
``detr-mnv3l-scenes``: ``--model edgekd:detr-mnv3l --lr 1e-3 --epochs 14 --more-epochs 12``.

    python benchmarks/detection_teacher.py [--model edgekd:detr-r18] [--lr 3e-4] [--scenes 5000]
        [--epochs 18] [--more-epochs 0] [--from FIRST_CYCLE/teacher.pt]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from default_teacher import TEACHER_DATA_SEED, ship

from edgekd import atomic
from edgekd.api import compress
from edgekd.console import console
from edgekd.recipe import load_recipe

HERE = Path(__file__).resolve().parent
TEACHERS = HERE.parent / "edgekd" / "teachers"


def train_teacher(
    model: str, lr: float, scenes: int, epochs: int, runs_dir: Path, start_from: Path | None = None
) -> dict:
    """The teacher stage for ``model`` at ``lr`` on ``scenes`` built-in scenes of the disjoint seed; its
    record and checkpoint. With ``start_from`` (a first cycle trained earlier) the stage only loads and
    scores it."""
    overrides = [
        f"teacher.model={model}",
        f"teacher.train.lr={lr}",
        f"runs_dir={runs_dir}",
        "name=shipped-detr-teacher",
        "data.name=scenes",
        f"seed={TEACHER_DATA_SEED}",
        f"data.scenes={scenes}",
        "data.val_fraction=0.05",
        f"teacher.checkpoint={start_from or 'null'}",
        "teacher.store=false",
        f"teacher.train.epochs={epochs}",
    ]
    recipe = load_recipe(None, overrides)
    start = time.perf_counter()
    outputs = compress(recipe, until="teacher")["teacher"]
    dumped = recipe.model_dump(mode="json", include={"seed", "data", "teacher"})
    dumped["teacher"]["checkpoint"] = None  # trained by this script (a first cycle's file is temporary)
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "outputs": outputs,
        "recipe": dumped,
        "overrides": [o for o in overrides if not o.startswith("teacher.checkpoint")],
        "epochs": epochs,
        "file": runs_dir / "shipped-detr-teacher" / outputs["model_file"],
    }


def train_more(trained: dict, epochs: int, runs_dir: Path) -> dict:
    """A second cycle of ``epochs`` from the first cycle's weights, on the same scenes: ``trained``,
    updated."""
    from edgekd.data import build_dataset
    from edgekd.detection.distill import build_detection_method
    from edgekd.detection.train import build_detector, train_detector
    from edgekd.models.checkpoint import load_weights, save_checkpoint
    from edgekd.recipe import TrainSpec

    recipe = load_recipe(None, trained["overrides"])
    train_set, val_set, meta = build_dataset(recipe.data, recipe.seed, runs_dir / "data")
    model = build_detector(recipe.teacher.model, meta, "teacher")
    load_weights(model, trained["file"], recipe.teacher.model)
    spec = TrainSpec(**{**recipe.teacher.train.model_dump(), "epochs": epochs})
    start = time.perf_counter()
    result = train_detector(
        model,
        build_detection_method("none", model, None, len(meta.classes)),
        train_set,
        val_set,
        spec,
        recipe.seed,
        runs_dir / "more",
        f"more-{epochs}",
        label="teacher, second cycle",
    )
    file = runs_dir / "more" / "teacher.pt"
    save_checkpoint(file, model, recipe.teacher.model, {"data_fingerprint": meta.fingerprint})
    last = result.history[-1]
    outputs = {**trained["outputs"], "history": [*trained["outputs"]["history"], *result.history],
               "val_map": last["val_map"], "val_map50": last["val_map50"]}  # fmt: skip
    train_record = {**trained["recipe"]["teacher"]["train"], "cycles": [trained["epochs"], epochs]}
    recipe_record = {**trained["recipe"], "teacher": {**trained["recipe"]["teacher"], "train": train_record}}
    wall = trained["wall_s"] + round(time.perf_counter() - start, 1)
    return {**trained, "outputs": outputs, "recipe": recipe_record, "file": file, "wall_s": wall}


def score_on_default_task(model: str, shipped: Path, runs_dir: Path) -> dict:
    """The shipped teacher's COCO mAP on the default detection run's held-out scenes (its seed)."""
    overrides = [f"runs_dir={runs_dir}", "name=score", f"teacher.model={model}",
                 f"teacher.checkpoint=builtin:{shipped.name}"]  # fmt: skip
    recipe = load_recipe(HERE.parent / "recipes" / "detection.yaml", overrides)
    outputs = compress(recipe, until="teacher")["teacher"]
    return {"seed": recipe.seed, "scenes": recipe.data.scenes, "val_map": outputs["val_map"],
            "val_map50": outputs["val_map50"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="edgekd:detr-r18", help="the registered DETR to train")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (both cycles)")
    parser.add_argument("--scenes", type=int, default=5000, help="teacher set: scenes (5 % held out)")
    parser.add_argument("--epochs", type=int, default=18, help="teacher epochs, first cycle")
    parser.add_argument("--more-epochs", type=int, default=0, help="teacher epochs, second cycle; 0: none")
    parser.add_argument(
        "--from", dest="start_from", type=Path, help="a first cycle's stage folder's teacher.pt: skip it"
    )
    args = parser.parse_args()
    runs_dir = Path(tempfile.mkdtemp(prefix="edgekd-detection-teacher-"))
    try:
        trained = train_teacher(args.model, args.lr, args.scenes, args.epochs, runs_dir, args.start_from)
        if args.start_from:  # the first cycle's history and wall time, from its stage folder
            stage = json.loads((args.start_from.parent / "stage.json").read_text(encoding="utf-8"))
            trained["outputs"]["history"] = stage["outputs"]["history"]
            trained["wall_s"] = stage["wall_s"]
        if args.more_epochs:
            trained = train_more(trained, args.more_epochs, runs_dir)
        history = trained["outputs"]["history"]
        own = {"own_held_out_map": trained["outputs"]["val_map"],
               "own_held_out_map50": trained["outputs"]["val_map50"],
               "own_held_out_map_per_epoch": [row["val_map"] for row in history]}  # fmt: skip
        shipped = TEACHERS / f"{args.model.partition(':')[2]}-scenes"
        path = ship(trained, shipped, "benchmarks/detection_teacher.py", own, half=True)
        console.print(f"shipped {path} ({path.stat().st_size / 1e6:.1f} MB): own held-out {own}")
        default = score_on_default_task(args.model, shipped, runs_dir)
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    provenance = shipped.with_suffix(".json")
    record = json.loads(provenance.read_text(encoding="utf-8"))
    record["default_task_held_out"] = default
    atomic.write_json(provenance, record)
    console.print(f"on the default task's held-out scenes: {default}; wrote {provenance}")


if __name__ == "__main__":
    main()
