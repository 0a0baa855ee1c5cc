"""Detection through the train side of the pipeline: the task routing, the detection data sources in the
dataset registry, the recipe's detection defaults, the one-line task mismatches, the DETR training loop
(resume), and the teacher and distill stages writing checkpoints that load_student rebuilds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd import teachers
from edgekd.data import build_dataset
from edgekd.detection.data import DetectionDataset
from edgekd.detection.synthetic import CLASSES, write_split
from edgekd.errors import DataError, RecipeError
from edgekd.pipeline import RunContext, StageResult
from edgekd.recipe import Recipe, load_recipe
from edgekd.tasks import DETECTION_DEFAULTS, TASKS, check_recipe, task_of

EDGEKD = [sys.executable, "-c", "from edgekd.cli import main; main()"]
SIDE = 64  # small images keep every DETR here fast
TEACHER = DETECTION_DEFAULTS["teacher.model"]  # edgekd:detr-r18
SHIPPED_TEACHER = "detr-r18-scenes"
MIN_SHIPPED_TEACHER_MAP50 = 0.45  # half of its 0.914 on these 64 scenes (seed 7); random weights: 0.0


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEKD, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgekd: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def scenes_recipe(tmp_path: Path, *overrides: str) -> Recipe:
    return load_recipe(
        None,
        [
            "data.name=scenes",
            "data.scenes=16",
            f"data.image_size={SIDE}",
            f"runs_dir={tmp_path / 'runs'}",
            *overrides,
        ],
    )


# --------------------------------------------------------------------------------- task routing


def test_task_of_names_detection_sources_only():
    assert TASKS == ("classification", "detection")
    for name in ("scenes", "coco", "yolo", "synthetic-scenes", "ultralytics", "COCO"):
        assert task_of(name) == "detection", name
    for name in ("radio-synthetic", "digits", "imagefolder", "npz:x.npz", "rml2016"):
        assert task_of(name) == "classification", name


def test_run_context_task_follows_the_data(tmp_path):
    assert RunContext(recipe=Recipe(), run_dir=tmp_path).task == "classification"
    assert RunContext(recipe=scenes_recipe(tmp_path), run_dir=tmp_path).task == "detection"


def test_detection_defaults_fill_only_what_the_recipe_leaves_unset(tmp_path):
    recipe = load_recipe(None, ["data.name=scenes"])
    assert (recipe.teacher.model, recipe.student.model) == ("edgekd:detr-r18", "edgekd:detr-mnv3")
    assert recipe.distill.method == "clockdistill"
    assert recipe.data.image_size == 128
    # the shipped radio teacher does not stand for scenes; the shipped DETR teacher does
    assert recipe.teacher.checkpoint == teachers.weights(SHIPPED_TEACHER)
    coco = load_recipe(None, ["data.name=coco", "data.path=x.json"])
    assert coco.teacher.checkpoint is None  # trained here
    mobilenet = load_recipe(None, ["data.name=scenes", "teacher.model=edgekd:detr-mnv3l"])
    assert mobilenet.teacher.checkpoint == teachers.weights("detr-mnv3l-scenes")  # the one shipped for it
    for train, lr in ((recipe.teacher.train, 3e-4), (recipe.distill.train, 1e-3)):
        assert (train.batch_size, train.lr, train.weight_decay) == (16, lr, 1e-4)
    chosen = load_recipe(None, ["data.name=scenes", "distill.method=none", "teacher.train.epochs=3"])
    assert chosen.distill.method == "none"
    assert (chosen.teacher.train.epochs, chosen.teacher.train.lr) == (3, 3e-4)
    again = Recipe.model_validate(recipe.model_dump(mode="json"))  # report.json's recipe round-trips
    assert again == recipe


def test_the_shipped_detr_teacher_detects_scenes_it_never_saw(tmp_path):
    """builtin:detr-r18-scenes (float16 on disk) loads into the float32 teacher and finds the objects of
    scenes from another seed than it was trained on (benchmarks/detection_teacher.py)."""
    from safetensors.torch import load_file

    from edgekd.detection.synthetic import load_synthetic
    from edgekd.detection.train import evaluate_model
    from edgekd.models import build_model
    from edgekd.models.checkpoint import load_weights

    shipped = teachers.weights(SHIPPED_TEACHER)
    provenance = json.loads(shipped.with_suffix(".json").read_text())
    assert provenance["model"] == TEACHER and provenance["weights_dtype"] == "float16"
    assert {tensor.dtype for tensor in load_file(shipped).values()} >= {torch.float16}
    _, held_out = load_synthetic(tmp_path, seed=7, train=1, val=64)
    model = build_model(TEACHER, len(CLASSES), 3, kwargs={"task": "detection"})
    load_weights(model, shipped, TEACHER)
    assert next(model.parameters()).dtype == torch.float32
    scores = evaluate_model(model, held_out)
    assert scores.map50 > MIN_SHIPPED_TEACHER_MAP50, scores


def test_shipped_detection_recipe_is_the_cli_defaults():
    shipped = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "detection.yaml")
    cli = load_recipe(None, ["data.name=scenes", "name=scenes", "target=x86-ort", "data.scenes=4000"])
    assert shipped == cli


def test_classification_recipes_are_unchanged():
    recipe = load_recipe(None, [])
    dumped = recipe.model_dump(mode="json")
    assert "images" not in dumped["data"] and "scenes" not in dumped["data"]
    assert (recipe.teacher.model, recipe.student.model, recipe.distill.method) == (
        "edgekd:clst",
        "edgekd:kd-cnn",
        "skd",
    )
    assert recipe.data.image_size == 32 and recipe.distill.train.lr == 3e-3
    digits = load_recipe(None, ["data.name=digits"])
    assert digits.student.model == "edgekd:kd-cnn" and digits.distill.method == "skd"


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (
            ["data.name=scenes", "distill.method=kd"],
            ["distill.method='kd'", "classification method", "detection"],
        ),
        (
            ["data.name=digits", "distill.method=clockdistill"],
            ["clockdistill", "detection method", "classification"],
        ),
        (["data.name=scenes", "teacher.model=edgekd:clst"], ["teacher.model='edgekd:clst'", "detr-r18"]),
        (["data.name=digits", "student.model=edgekd:detr-mnv3"], ["student.model", "detection model"]),
        (["data.name=scenes", "distill.options.dkd.nckd_weight=2"], ["distill.options.dkd"]),
        (["data.name=scenes", "distill.world_size=2"], ["distill.world_size"]),
        (["data.name=scenes", "distill.options.clockdistill.alpha=-1"], ["distill.options.clockdistill"]),
    ],
)
def test_task_mismatches_are_one_recipe_error(overrides, fragments):
    with pytest.raises(RecipeError) as caught:
        check_recipe(load_recipe(None, overrides))
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_cli_method_of_the_other_task_is_one_line_exit_2(tmp_path):
    result = run_cli(
        "compress", "--data", "digits", "--method", "clockdistill", "--set", f"runs_dir={tmp_path}"
    )
    assert_one_line(result, "clockdistill", "detection method", "classification dataset")
    result = run_cli("compress", "--data", "scenes", "--method", "kd", "--set", f"runs_dir={tmp_path}")
    assert_one_line(result, "'kd'", "classification method", "detection dataset", "clockdistill")
    assert not any((tmp_path / "scenes").glob("*")), "nothing ran"


def test_cli_methods_lists_both_tasks():
    result = run_cli("methods")
    assert result.returncode == 0, result.stderr
    rows = {
        (parts[0], parts[1])
        for line in result.stdout.splitlines()
        if len(parts := [p.strip() for p in line.split("│") if p.strip()]) >= 2
    }
    for row in [("clockdistill", "detection"), ("kd-detr", "detection"), ("skd", "classification")]:
        assert row in rows
    assert ("none", "detection") in rows and ("none", "classification") in rows


# ------------------------------------------------------------------------------ data sources


def test_scenes_source_through_build_dataset(tmp_path):
    recipe = scenes_recipe(tmp_path)
    train, val, meta = build_dataset(recipe.data, recipe.seed, data_dir=tmp_path / "data")
    assert isinstance(train, DetectionDataset) and isinstance(val, DetectionDataset)
    assert (len(train), len(val)) == (12, 4)  # 16 scenes, val_fraction 0.25
    assert meta.task == "detection" and meta.name == "scenes" and meta.labelled
    assert meta.input_shape == (3, SIDE, SIDE) and train.images.shape[1:] == (3, SIDE, SIDE)
    assert meta.classes == CLASSES
    assert meta.normalisation["letterbox"]["boxes"] == "cxcywh in [0, 1]"
    assert (tmp_path / "data" / "scenes-s0-n12+4-128px-v1" / "train" / "annotations.json").is_file()
    assert train.objects >= len(train) and all(
        len(b) == len(lab) for b, lab in zip(train.boxes, train.labels, strict=True)
    )
    again = build_dataset(recipe.data, recipe.seed, data_dir=tmp_path / "data")[2]
    assert again.fingerprint == meta.fingerprint  # deterministic, read back from the written set
    other = build_dataset(recipe.data, 1, data_dir=tmp_path / "data")[2]
    assert other.fingerprint != meta.fingerprint
    ctx = RunContext(recipe=recipe, run_dir=recipe.run_dir)
    assert ctx.dataset[2].fingerprint == meta.fingerprint  # the pipeline writes under <runs>/../data
    assert (tmp_path / "data").is_dir()


def test_scenes_too_few_is_one_line(tmp_path):
    recipe = scenes_recipe(tmp_path, "data.scenes=2", "data.val_fraction=0.1")
    with pytest.raises(RecipeError, match="data.scenes=2"):
        build_dataset(recipe.data, 0, data_dir=tmp_path)


def test_coco_source_single_json_and_split_folder(tmp_path):
    json_file = write_split(tmp_path / "coco", 3, "train", 8, size=SIDE)
    recipe = load_recipe(None, ["data.name=coco", f"data.path={json_file}", f"data.image_size={SIDE}"])
    train, val, meta = build_dataset(recipe.data, 0)
    assert (len(train), len(val)) == (6, 2) and meta.task == "detection" and meta.name == "coco"
    assert meta.classes == CLASSES and meta.input_shape == (3, SIDE, SIDE)
    # images elsewhere: data.images
    moved = tmp_path / "elsewhere"  # file_name entries are images/NNNNNN.jpg, relative to data.images
    moved.mkdir()
    (tmp_path / "coco" / "train" / "images").rename(moved / "images")
    with pytest.raises(DataError, match="image not found"):
        build_dataset(recipe.data, 0)
    recipe = load_recipe(
        None, ["data.name=coco", f"data.path={json_file}", f"data.images={moved}", f"data.image_size={SIDE}"]
    )
    assert len(build_dataset(recipe.data, 0)[0]) == 6
    # a folder with train/ and val/ annotations keeps its split
    write_split(tmp_path / "split", 3, "train", 5, size=SIDE)
    write_split(tmp_path / "split", 3, "val", 3, size=SIDE)
    recipe = load_recipe(
        None, ["data.name=coco", f"data.path={tmp_path / 'split'}", f"data.image_size={SIDE}"]
    )
    train, val, _ = build_dataset(recipe.data, 0)
    assert (len(train), len(val)) == (5, 3)


def test_coco_source_needs_a_path(tmp_path):
    with pytest.raises(RecipeError, match="needs data.path"):
        build_dataset(load_recipe(None, ["data.name=coco"]).data, 0)
    with pytest.raises(DataError, match="not found"):
        build_dataset(load_recipe(None, ["data.name=coco", f"data.path={tmp_path / 'no.json'}"]).data, 0)


def _yolo_folder(root: Path, splits: tuple[str, ...]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("cat\ndog\n")
    for split in splits:
        for index in range(4):
            image_dir, label_dir = root / "images" / split, root / "labels" / split
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(image_dir / f"{index}.png")
            (label_dir / f"{index}.txt").write_text(f"{index % 2} 0.5 0.5 0.25 0.5\n1 0.2 0.3 0.1 0.1\n")


def test_yolo_source_split_folders_and_flat(tmp_path):
    _yolo_folder(tmp_path / "split", ("train", "val"))
    recipe = load_recipe(
        None, ["data.name=yolo", f"data.path={tmp_path / 'split'}", f"data.image_size={SIDE}"]
    )
    train, val, meta = build_dataset(recipe.data, 0)
    assert (len(train), len(val)) == (4, 4) and meta.classes == ["cat", "dog"] and meta.task == "detection"
    _yolo_folder(tmp_path / "flat", ("",))
    recipe = load_recipe(
        None, ["data.name=yolo", f"data.path={tmp_path / 'flat'}", f"data.image_size={SIDE}"]
    )
    train, val, _ = build_dataset(recipe.data, 0)
    assert (len(train), len(val)) == (3, 1)


# ------------------------------------------------------------------------------ training loop


def _tiny_scenes(tmp_path: Path) -> tuple[DetectionDataset, DetectionDataset, object]:
    recipe = scenes_recipe(tmp_path, "data.scenes=8")
    return build_dataset(recipe.data, 0, data_dir=tmp_path / "data")


def test_train_detector_records_map_and_resumes(tmp_path):
    from edgekd.detection.distill import build_detection_method
    from edgekd.detection.train import LATEST, build_detector, train_detector
    from edgekd.recipe import TrainSpec

    train, val, meta = _tiny_scenes(tmp_path)

    def run(epochs: int):
        torch.manual_seed(0)
        model = build_detector("edgekd:detr-mnv3", meta, "student")
        method = build_detection_method("none", model, None, len(meta.classes))
        spec = TrainSpec(epochs=epochs, batch_size=4, lr=1e-4)
        return model, train_detector(model, method, train, val, spec, 0, tmp_path, "fp", log=lambda m: None)

    _, first = run(1)
    assert (tmp_path / LATEST).is_file() and first.resumed_from_epoch == 0
    row = first.history[0]
    assert row["epoch"] == 1 and np.isfinite(row["train_loss"]) and row["steps"] == 2
    assert 0.0 <= row["val_map"] <= row["val_map50"] <= 1.0
    _, second = run(5)
    assert second.resumed_from_epoch == 1 and [r["epoch"] for r in second.history] == [1, 2, 3, 4, 5]
    assert second.history[0] == row
    lrs = [r["lr"] for r in second.history]  # DAB-DETR's tenfold drop for the last fifth
    assert lrs[:4] == [1e-4] * 4 and lrs[4] == pytest.approx(1e-5)


def test_load_student_rebuilds_a_detr(tmp_path):
    from edgekd.models.checkpoint import save_checkpoint
    from edgekd.models.detr import DETR
    from edgekd.stages.model_import import load_student

    recipe = scenes_recipe(tmp_path, "data.scenes=8")
    ctx = RunContext(recipe=recipe, run_dir=tmp_path / "run")
    _, val, meta = ctx.dataset
    from edgekd.detection.train import build_detector

    torch.manual_seed(1)
    student = build_detector(recipe.student.model, meta, "student")
    (ctx.run_dir / "02-distill").mkdir(parents=True)
    save_checkpoint(ctx.run_dir / "02-distill" / "student.pt", student, recipe.student.model)
    record = ctx.run_dir / "02-distill" / "stage.json"
    ctx.results["distill"] = StageResult(
        "distill", {"model_file": "02-distill/student.pt"}, "f", 0.0, True, record
    )
    rebuilt = load_student(ctx)
    assert isinstance(rebuilt, DETR) and rebuilt.num_classes == len(CLASSES) and not rebuilt.training
    images = torch.from_numpy(val.images[:2])
    with torch.no_grad():
        assert torch.equal(rebuilt(images)["boxes"], student.eval()(images)["boxes"])


def test_teacher_memory_cache_trains_as_the_live_teacher_with_one_encoder_pass_per_image(tmp_path):
    """With the cache the teacher's encoder runs once per image before training (not every step), and
    the losses and the trained student are those of the live teacher (float tolerance)."""
    from edgekd.detection.distill import build_detection_method
    from edgekd.detection.train import build_detector, train_detector
    from edgekd.recipe import TrainSpec

    train, val, meta = _tiny_scenes(tmp_path)
    torch.manual_seed(1)
    teacher = build_detector("edgekd:detr-mnv3l", meta, "teacher")
    encodes = []
    teacher.encode = lambda images, live=teacher.encode: encodes.append(len(images)) or live(images)

    def run(cache: bool):
        encodes.clear()
        torch.manual_seed(0)
        student = build_detector("edgekd:detr-mnv3", meta, "student")
        method = build_detection_method("clockdistill", student, teacher, len(meta.classes))
        spec = TrainSpec(epochs=2, batch_size=4, lr=1e-4)
        result = train_detector(
            student, method, train, val, spec, 0, tmp_path / str(cache), "fp",
            teacher=teacher, log=lambda m: None, cache_teacher=cache,
        )  # fmt: skip
        return result.history, student.state_dict(), list(encodes)

    live, live_weights, live_encodes = run(False)
    cached, cached_weights, cached_encodes = run(True)
    steps = [min(4, len(train) - first) for first in range(0, len(train), 4)]
    assert live_encodes == steps * 2 and cached_encodes == [len(train)]  # every step of 2 epochs vs once
    for a, b in zip(live, cached, strict=True):
        for key in ("train_loss", "set_loss", "memory_loss", "logit_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for name, tensor in live_weights.items():
        torch.testing.assert_close(cached_weights[name], tensor, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_compress_scenes_through_distill(tmp_path):
    """`edgekd compress --data scenes` with the detection defaults, tiny: teacher and distill stages."""
    from edgekd.api import compress
    from edgekd.stages.model_import import load_student

    recipe = scenes_recipe(
        tmp_path,
        "data.scenes=24",
        "teacher.checkpoint=null",
        "teacher.train.epochs=1",
        "distill.train.epochs=2",
    )
    results = compress(recipe, until="distill", log=lambda m: None)
    teacher, distill = results["teacher"], results["distill"]
    assert teacher["model"] == TEACHER and teacher["origin"] == "trained here on the set loss"
    assert distill["model"] == "edgekd:detr-mnv3" and distill["method"] == "clockdistill"
    for outputs in (teacher, distill):
        assert 0.0 <= outputs["val_map"] <= outputs["val_map50"] <= 1.0
    assert [row["epoch"] for row in distill["history"]] == [1, 2]
    assert distill["history"][-1]["memory_loss"] > 0 and distill["history"][-1]["logit_loss"] > 0
    assert distill["method_options"]["alpha"] == 2.0 and distill["params"] > 0
    record = json.loads((recipe.run_dir / "02-distill" / "stage.json").read_text())
    assert record["outputs"]["model_file"] == "02-distill/student.pt"
    ctx = RunContext(recipe=recipe, run_dir=recipe.run_dir)
    ctx.results["distill"] = StageResult("distill", distill, "f", 0.0, True, Path("x"))
    assert load_student(ctx).num_classes == len(CLASSES)
    again = compress(recipe, until="distill", log=lambda m: None)  # cached: same outputs
    assert again["distill"]["val_map"] == distill["val_map"]
