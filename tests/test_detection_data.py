"""Detection data and metrics: built-in scenes, COCO and YOLO loaders, their one-line errors, COCO mAP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekd.data.vision import normalise_images
from edgekd.detection import synthetic
from edgekd.detection.coco import load_coco
from edgekd.detection.data import split_dataset
from edgekd.detection.metrics import Detections, agreement, evaluate, evaluate_dataset, postprocess
from edgekd.detection.yolo import load_yolo
from edgekd.errors import DataError, EdgekdError

# --------------------------------------------------------------------------- built-in scenes


def test_synthetic_scenes_are_deterministic_and_independent_of_count():
    first = synthetic.scenes(3, "train", 6)
    again = synthetic.scenes(3, "train", 4)
    for a, b in zip(first[:4], again, strict=True):
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.labels, b.labels)
    other_seed = synthetic.scenes(4, "train", 1)[0]
    held_out = synthetic.scenes(3, "val", 1)[0]
    assert not np.array_equal(first[0].image, other_seed.image)
    assert not np.array_equal(first[0].image, held_out.image)
    assert first[0].image.shape == (synthetic.SCENE_SIZE, synthetic.SCENE_SIZE, 3)
    assert first[0].image.dtype == np.uint8


def test_synthetic_boxes_are_tight_around_the_pasted_pixels():
    scenes = synthetic.scenes(0, "train", 40, size=96, debug=True)
    counts = []
    for scene in scenes:
        assert synthetic.MIN_OBJECTS <= len(scene.labels) <= synthetic.MAX_OBJECTS
        assert scene.labels.min() >= 0 and scene.labels.max() < len(synthetic.CLASSES)
        inside_some_box = np.zeros((96, 96), dtype=bool)
        for box, mask in zip(scene.boxes.astype(int), scene.masks, strict=True):
            x0, y0, x1, y1 = box
            inside = np.zeros_like(mask)
            inside[y0:y1, x0:x1] = True
            assert mask.any() and not (mask & ~inside).any()  # every object pixel lies in its box
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (y0, y1, x0, x1)  # and the box is tight
            inside_some_box |= inside
        changed = np.abs(scene.clean - scene.background).max(axis=0) > 0
        assert not (changed & ~inside_some_box).any()  # pasting changed no pixel outside the boxes
        for i in range(len(scene.boxes)):
            for j in range(i):
                a, b = scene.boxes[i], scene.boxes[j]
                inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
                union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
                assert inter / union <= synthetic.MAX_IOU + 1e-9
        counts.append(len(scene.labels))
    assert len(set(counts)) >= 4  # scenes vary in how many objects they hold
    labels = np.concatenate([s.labels for s in scenes])
    assert len(np.unique(labels)) == len(synthetic.CLASSES)  # shapes and all ten digits appear


def test_synthetic_set_is_written_as_coco_and_read_back(tmp_path):
    train, val = synthetic.load_synthetic(tmp_path, seed=1, train=6, val=3)
    assert (len(train), len(val)) == (6, 3)
    assert train.classes == synthetic.CLASSES and len(synthetic.CLASSES) == 13
    assert train.images.shape == (6, 3, 128, 128) and train.images.dtype == np.float32
    scenes = synthetic.scenes(1, "train", 6)
    for i, scene in enumerate(scenes):
        x0, y0, x1, y1 = scene.boxes.T / 128
        expected = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=1)
        assert np.allclose(train.boxes[i], expected, atol=1e-6)
        assert np.array_equal(train.labels[i], scene.labels)
        # JPEG at quality 95: the pixels read back are within a few levels of the rendered ones
        restored = train.images[i] * np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1) + np.array(
            [0.485, 0.456, 0.406]
        ).reshape(3, 1, 1)
        assert np.abs(restored * 255 - scene.image.transpose(2, 0, 1)).mean() < 6
    annotations = tmp_path / "train" / "annotations.json"
    stamp = annotations.stat().st_mtime_ns
    again, _ = synthetic.load_synthetic(tmp_path, seed=1, train=6, val=3)
    assert annotations.stat().st_mtime_ns == stamp  # same settings: reused, not rewritten
    assert again.fingerprint == train.fingerprint and np.array_equal(again.images, train.images)
    other, _ = synthetic.load_synthetic(tmp_path / "other", seed=2, train=6, val=3)
    assert other.fingerprint != train.fingerprint
    small, _ = synthetic.load_synthetic(tmp_path, seed=1, image_size=64, train=6, val=3)
    assert small.images.shape == (6, 3, 64, 64)
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(small.boxes, train.boxes, strict=True))
    part_a, part_b = split_dataset(train, 0.5, seed=0)
    assert sorted(part_a.names + part_b.names) == sorted(train.names) and len(part_b) == 3


# --------------------------------------------------------------------------- COCO and YOLO files

# Three images of different shapes; boxes (x0, y0, x1, y1) in pixels, class 0 = "cat", 1 = "dog".
SIZES = {"a.png": (80, 60), "b.png": (50, 100), "c.png": (64, 64)}
OBJECTS = {
    "a.png": [((10, 5, 40, 35), 0), ((50, 20, 80, 60), 1)],
    "b.png": [((0, 0, 25, 50), 1)],
    "c.png": [],  # a negative image
}


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (width, height) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)


def _coco(tmp_path: Path, **changes) -> Path:
    _write_images(tmp_path / "images")
    images = [
        {"id": i + 1, "file_name": name, "width": w, "height": h}
        for i, (name, (w, h)) in enumerate(SIZES.items())
    ]
    annotations = []
    for i, name in enumerate(SIZES):
        for (x0, y0, x1, y1), label in OBJECTS[name]:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": (5, 9)[label],  # COCO ids need not be 0..C-1
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
    document = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 9, "name": "dog"}, {"id": 5, "name": "cat"}],
    }
    for key, value in changes.items():
        document[key] = value(document[key]) if callable(value) else value
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(document))
    return path


def _yolo(tmp_path: Path, classes: str = "cat\ndog\n", extra: dict | None = None) -> Path:
    root = tmp_path / "yolo"
    _write_images(root / "images")
    (root / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text(classes)
    for name, objects in OBJECTS.items():
        if not objects:
            continue  # an image without a label file has no objects
        w, h = SIZES[name]
        lines = [
            f"{label} {(x0 + x1) / 2 / w} {(y0 + y1) / 2 / h} {(x1 - x0) / w} {(y1 - y0) / h}"
            for (x0, y0, x1, y1), label in objects
        ]
        (root / "labels" / name).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    for relative, text in (extra or {}).items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


def test_coco_and_yolo_loaders_give_the_same_dataset(tmp_path):
    coco = load_coco(_coco(tmp_path), size=32)
    yolo = load_yolo(_yolo(tmp_path), size=32)
    assert coco.classes == yolo.classes == ["cat", "dog"]
    assert coco.names == yolo.names == ["a.png", "b.png", "c.png"]
    assert coco.images.shape == yolo.images.shape == (3, 3, 32, 32)
    assert np.array_equal(coco.images, yolo.images)
    for i, name in enumerate(SIZES):
        expected = np.array([box for box, _ in OBJECTS[name]], dtype=np.float64).reshape(-1, 4)
        assert np.array_equal(coco.labels[i], [label for _, label in OBJECTS[name]])
        assert np.array_equal(yolo.labels[i], coco.labels[i])
        assert np.allclose(yolo.boxes[i], coco.boxes[i], atol=1e-6)
        assert np.allclose(coco.boxes_xyxy_pixels(i), expected, atol=1e-3)  # the letterbox maps back
        assert coco.boxes[i].min(initial=0) >= 0 and coco.boxes[i].max(initial=1) <= 1
    # a.png (80x60) -> 32x24 centred: 4 rows of padding above and below, whose normalised value is 0
    assert np.allclose(coco.images[0, :, :4], 0, atol=1e-6) and np.allclose(
        coco.images[0, :, -4:], 0, atol=1e-6
    )
    # its first box, (10, 5)-(40, 35) in 80x60 pixels: x 4..16 and y 2..14 (+4 padding) of 32
    assert np.allclose(coco.boxes[0][0], [10 / 32, 12 / 32, 12 / 32, 12 / 32], atol=1e-6)
    # the square image is only resized and normalised, as the classification images are
    pixels = np.asarray(Image.open(tmp_path / "images" / "c.png").resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(
        coco.images[2], normalise_images(pixels.transpose(2, 0, 1).astype(np.float32) / 255.0)
    )
    assert coco.fingerprint != yolo.fingerprint and len(coco.fingerprint) == 64
    assert load_coco(tmp_path / "annotations.json", size=32).fingerprint == coco.fingerprint


def test_loaders_find_images_in_other_places_and_read_yaml_classes(tmp_path):
    path = _coco(tmp_path)
    (tmp_path / "pictures").mkdir()
    for name in SIZES:
        (tmp_path / "images" / name).rename(tmp_path / "pictures" / name)
    assert len(load_coco(path, 16, images_dir=tmp_path / "pictures")) == 3
    root = _yolo(tmp_path, classes="")
    (root / "classes.txt").unlink()
    (root / "data.yaml").write_text("path: .\ntrain: images\nnames:\n  0: cat\n  1: dog\n")
    assert load_yolo(root, 16).classes == ["cat", "dog"]
    (root / "images" / "val").mkdir()
    (root / "labels" / "val").mkdir()
    (root / "images" / "a.png").rename(root / "images" / "val" / "a.png")
    (root / "labels" / "a.txt").rename(root / "labels" / "val" / "a.txt")
    val = load_yolo(root, 16, split="val")
    assert val.names == ["a.png"] and np.array_equal(val.labels[0], [0, 1])
    assert len(load_yolo(root, 16)) == 3  # without a split: every image under images/


def _drop_image_file(tmp_path: Path) -> Path:
    path = _coco(tmp_path)
    (tmp_path / "images" / "b.png").unlink()
    return path


def _corrupt_image(tmp_path: Path) -> Path:
    path = _coco(tmp_path)
    (tmp_path / "images" / "a.png").write_bytes(b"not an image")
    return path


def _box(index: int, bbox: list) -> callable:
    def change(annotations: list) -> list:
        annotations[index]["bbox"] = bbox
        return annotations

    return change


COCO_CASES = {
    "missing image": (_drop_image_file, ["b.png", "image not found", "images entry id 2"]),
    "box outside": (
        lambda p: _coco(p, annotations=_box(1, [50, 20, 45, 40])),
        ["annotations[1]", "outside the 80x60 image"],
    ),
    "unknown category": (
        lambda p: _coco(p, annotations=lambda a: [{**a[0], "category_id": 3}, *a[1:]]),
        ["annotations[0]", "unknown category_id 3", "categories: 5, 9"],
    ),
    "empty annotations": (lambda p: _coco(p, annotations=[]), ['"annotations" holds no boxes', "empty"]),
    "one class": (
        lambda p: _coco(p, categories=[{"id": 5, "name": "cat"}], annotations=lambda a: a[:1]),
        ['"categories"', "1 class (cat)", "at least 2"],
    ),
    "malformed bbox": (lambda p: _coco(p, annotations=_box(0, [1, 2, 3])), ['"bbox"', "[1, 2, 3]"]),
    "unknown image": (
        lambda p: _coco(p, annotations=lambda a: [{**a[0], "image_id": 42}, *a[1:]]),
        ["image_id 42"],
    ),
    "wrong size": (
        lambda p: _coco(p, images=lambda i: [{**i[0], "width": 81}, *i[1:]]),
        ['"width" 81', "80x60"],
    ),
    "not json": (lambda p: _write(p / "annotations.json", "{oops"), ["not valid JSON", "line 1"]),
    "no such file": (lambda p: p / "missing.json", ["missing.json", "not found"]),
    "corrupt image": (_corrupt_image, ["a.png", "cannot be read as an image"]),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _assert_one_line(error: pytest.ExceptionInfo, fragments: list[str]) -> None:
    message = str(error.value)
    assert isinstance(error.value, DataError) and isinstance(error.value, EdgekdError)
    assert getattr(error.value, "exit_code", 2) == 2  # the CLI prints it as one line and exits 2
    assert "\n" not in message and message.strip() == message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("case", list(COCO_CASES))
def test_bad_coco_input_is_one_line(tmp_path, case):
    build, fragments = COCO_CASES[case]
    path = build(tmp_path)
    with pytest.raises(DataError) as error:
        load_coco(path, 16)
    _assert_one_line(error, fragments)


YOLO_CASES = {
    "malformed line": (
        {"labels/b.txt": "1 0.5 0.5 0.5\n"},
        "",
        ["b.txt line 1", "4 values", "class cx cy w h"],
    ),
    "polygon line": ({"labels/b.txt": "1 0.1 0.1 0.5 0.1 0.5 0.5\n"}, "", ["polygon"]),
    "not numbers": ({"labels/b.txt": "1 a b c d\n"}, "", ["b.txt line 1", "not numbers"]),
    "box outside": (
        {"labels/b.txt": "1 0.9 0.5 0.5 0.5\n"},
        "",
        ["b.txt line 1", "outside the 50x100 image"],
    ),
    "unknown class": (
        {"labels/b.txt": "7 0.5 0.5 0.2 0.2\n"},
        "",
        ["b.txt line 1", "unknown class 7", "0..1"],
    ),
    "missing image": ({"labels/d.txt": "0 0.5 0.5 0.2 0.2\n"}, "", ["d.txt", "image is missing"]),
    "empty annotations": ({"labels/a.txt": "", "labels/b.txt": "\n"}, "", ["no boxes in any label file"]),
    "one class": ({}, "cat\n", ["classes.txt", "1 class (cat)", "at least 2"]),
}


@pytest.mark.parametrize("case", list(YOLO_CASES))
def test_bad_yolo_input_is_one_line(tmp_path, case):
    extra, classes, fragments = YOLO_CASES[case]
    root = _yolo(tmp_path, classes=classes or "cat\ndog\n", extra=extra)
    with pytest.raises(DataError) as error:
        load_yolo(root, 16)
    _assert_one_line(error, fragments)


def test_yolo_folder_without_class_names_or_labels_is_one_line(tmp_path):
    root = _yolo(tmp_path)
    (root / "classes.txt").unlink()
    with pytest.raises(DataError) as error:
        load_yolo(root, 16)
    _assert_one_line(error, ["no data.yaml or classes.txt"])
    (root / "data.yaml").write_text("names: 3\n")
    with pytest.raises(DataError) as error:
        load_yolo(root, 16)
    _assert_one_line(error, ["data.yaml", '"names" is 3'])


def test_a_box_within_the_tolerance_is_clipped_not_refused(tmp_path):
    data = load_coco(_coco(tmp_path, annotations=_box(1, [50, 20, 30.5, 40.4])), 32)  # 0.5 px beyond 80x60
    assert data.boxes_xyxy_pixels(0)[1].tolist() == pytest.approx([50, 20, 80, 60], abs=1e-3)


# --------------------------------------------------------------------------- mAP


def _detections_from_truth(boxes, labels, shift=0.0):
    pairs = zip(boxes, labels, strict=True)
    return [Detections(b + np.array([shift, 0, 0, 0]), np.ones(len(b)), lab) for b, lab in pairs]


def test_map_is_one_for_perfect_predictions_and_lower_for_shifted_boxes(tmp_path):
    train, _ = synthetic.load_synthetic(tmp_path, seed=0, train=8, val=1)
    perfect = evaluate_dataset(train, _detections_from_truth(train.boxes, train.labels))
    assert perfect.map == pytest.approx(1.0) and perfect.map50 == pytest.approx(1.0)
    assert perfect.images == 8 and perfect.objects == train.objects
    present = {train.classes[c] for labels in train.labels for c in labels}
    for name, row in perfect.per_class.items():
        assert (row["map"] == pytest.approx(1.0)) if name in present else math.isnan(row["map"])
    shifted = evaluate_dataset(train, _detections_from_truth(train.boxes, train.labels, shift=0.03))
    assert shifted.map < 0.9 and shifted.map < perfect.map
    assert shifted.map50 >= shifted.map
    nothing = evaluate_dataset(train, [Detections(np.zeros((0, 4)), [], []) for _ in range(len(train))])
    assert nothing.map == 0.0 and nothing.map50 == 0.0


def test_map_equals_the_hand_computed_value():
    truth = [np.array([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]])]
    labels = [np.array([0, 0])]
    # One object found exactly (score 0.9), one false positive ranked below it, the other object missed:
    # precision 1 up to recall 0.5, so AP = 51 of COCO's 101 recall points at every IoU threshold.
    found = [Detections([[0.25, 0.25, 0.2, 0.2], [0.5, 0.1, 0.1, 0.1]], [0.9, 0.8], [0, 0])]
    scores = evaluate(truth, labels, found, ["a", "b"], image_size=100)
    assert scores.map == pytest.approx(51 / 101) and scores.map50 == pytest.approx(51 / 101)
    # One object, one detection with IoU 0.72 (its height cut to 0.72, same top): a match at the IoU
    # thresholds .50 .55 .60 .65 .70, a miss at the other five, so mAP = 0.5 and mAP@.5 = 1.
    box = np.array([[0.5, 0.5, 0.4, 0.4]])
    cut = np.array([[0.5, 0.3 + 0.4 * 0.72 / 2, 0.4, 0.4 * 0.72]])
    scores = evaluate([box], [np.array([1])], [Detections(cut, [0.5], [1])], ["a", "b"], image_size=100)
    assert scores.map == pytest.approx(0.5) and scores.map50 == pytest.approx(1.0)
    # Two classes, one found and one given the wrong label: per class 1 and 0, overall their mean.
    two = np.array([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    scores = evaluate([two], [np.array([0, 1])], [Detections(two, [0.9, 0.9], [0, 0])], ["a", "b"], 100)
    assert scores.per_class["a"]["map"] == pytest.approx(1.0) and scores.per_class["b"]["map"] == 0.0
    assert scores.map == pytest.approx(0.5) and scores.per_class["b"]["objects"] == 1


def test_agreement_scores_an_artifact_against_the_models_own_detections():
    rng = np.random.default_rng(0)
    logits, boxes = rng.normal(0, 3, (4, 10, 3)), rng.uniform(0.2, 0.8, (4, 10, 4)) * [1, 1, 0.3, 0.3]
    reference = postprocess(logits, boxes, top_k=20)
    same = agreement(reference, reference, ["a", "b", "c"], image_size=64)
    assert same.map == pytest.approx(1.0)
    noisy = postprocess(logits + rng.normal(0, 2, logits.shape), boxes + rng.normal(0, 0.02, boxes.shape), 20)
    assert agreement(reference, noisy, ["a", "b", "c"], 64).map < 1.0
    quiet = [Detections(r.boxes, r.scores * 0, r.labels) for r in reference]
    assert math.isnan(agreement(quiet, reference, ["a", "b", "c"], 64).map)  # the model found nothing


def test_postprocess_takes_the_top_k_query_class_pairs():
    import torch

    logits = np.full((1, 3, 2), -10.0)
    logits[0, 0, 1], logits[0, 2, 0], logits[0, 1, 1] = 2.0, 1.0, -1.0  # sigmoid .881, .731, .269
    boxes = np.arange(12, dtype=np.float32).reshape(1, 3, 4) / 12
    (found,) = postprocess(torch.from_numpy(logits), torch.from_numpy(boxes), top_k=2)
    assert found.labels.tolist() == [1, 0] and np.allclose(found.boxes, boxes[0, [0, 2]])
    assert found.scores == pytest.approx([1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))])
    (kept,) = postprocess(logits, boxes, top_k=10, score_threshold=0.25)
    assert len(kept) == 3 and kept.scores.min() >= 0.25
    # softmax: the last column is "no object"; each query keeps its best real class
    softmax = np.array([[[3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 2.0, 0.0]]])
    (best,) = postprocess(softmax, boxes, top_k=2, activation="softmax")
    assert best.labels.tolist() == [0, 1] and np.allclose(best.boxes, boxes[0, [0, 2]])
