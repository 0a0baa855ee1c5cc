"""DisWOT student search: the Gram/CAM pieces against hand values, the score, budgets and the CLI."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.data.base import ArrayDataset, DatasetMeta
from edgekd.distill.search import (
    Budget,
    diswot_score,
    grad_cam,
    gram_distance,
    normalised_gram,
    rank_students,
    relation_gram,
    semantic_gram,
)
from edgekd.errors import ModelError, RecipeError
from edgekd.models import build_model
from tests.test_cli import assert_user_error, run_cli

CLASSES = 3


def radio_data(frames: int = 24, length: int = 64) -> tuple[ArrayDataset, ArrayDataset, DatasetMeta]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((frames, 2, length)).astype(np.float32)
    data = ArrayDataset(x, np.arange(frames) % CLASSES, None)
    meta = DatasetMeta("tiny", "classification", (2, length), ["a", "b", "c"], {}, "f" * 64, "test")
    return data, data, meta


def seeded_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, num_classes=CLASSES, in_channels=2, input_shape=(2, 64))


def test_normalised_gram_and_distance_by_hand():
    gram = normalised_gram(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))  # [[1, 1], [1, 2]] before normalising
    expected = torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)], [1 / math.sqrt(5), 2 / math.sqrt(5)]])
    assert torch.allclose(gram, expected)
    identity = normalised_gram(torch.eye(2))
    # rows: |(1, 0) - (.7071, .7071)|^2 = 0.5858, |(0, 1) - (.4472, .8944)|^2 = 0.2111; mean 0.3985
    by_hand = ((1 - 1 / math.sqrt(2)) ** 2 + 0.5 + 0.2 + (1 - 2 / math.sqrt(5)) ** 2) / 2
    assert gram_distance(identity, gram) == pytest.approx(by_hand, abs=1e-6)
    assert gram_distance(gram, gram) == 0.0


def test_grad_cam_of_a_pooled_linear_head_is_cam_from_the_classifier_weights():
    feature_map = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True)  # (B=1, C=2, S=2)
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])  # 3 classes
    logits = feature_map.mean(dim=2) @ weights.T
    cams = grad_cam(feature_map, logits)
    # alpha_k = w_k / S, S = 2: class 0 -> [1, 2] / 2, class 1 -> [3, 4] / 2, class 2 -> ([1, 2] - [3, 4]) / 2
    assert torch.allclose(cams, torch.tensor([[[0.5, 1.0], [1.5, 2.0], [-1.0, -1.0]]]))
    semantic = semantic_gram(cams)
    assert semantic.shape == (3, 3)
    assert torch.allclose(semantic, normalised_gram(cams[0]))  # one sample: the Gram of its class maps


def test_relation_gram_is_per_sample_and_ignores_the_map_layout():
    maps = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2)  # (B, C, H, W)
    as_sequence = maps.reshape(2, 3, 4)  # (B, C, L), the radio layout
    assert relation_gram(maps).shape == (2, 2)
    assert torch.equal(relation_gram(maps), relation_gram(as_sequence))


def test_identical_student_scores_zero_and_a_different_one_more():
    teacher = seeded_model("edgekd:kd-cnn")
    x = torch.from_numpy(radio_data()[0].x)
    same = diswot_score(teacher, copy.deepcopy(teacher), x)
    assert same == {"semantic": 0.0, "relation": 0.0, "score": 0.0}
    other = diswot_score(teacher, seeded_model("edgekd:kd-mobilenet"), x)
    assert other["semantic"] > 0 and other["relation"] > 0
    assert other["score"] == pytest.approx(other["semantic"] + other["relation"])
    reseeded = diswot_score(teacher, seeded_model("edgekd:kd-cnn", seed=1), x)
    assert 0 < reseeded["score"] <= 8


def test_rank_students_puts_the_teachers_twin_first_and_is_deterministic():
    teacher = seeded_model("edgekd:kd-cnn")  # the candidate edgekd:kd-cnn is built with the same seed
    names = ["edgekd:kd-mobilenet", "edgekd:kd-cnn", "edgekd:cnn"]
    ranked = rank_students(teacher, names, radio_data(), batch=16, seed=0)
    assert [c.rank for c in ranked] == [1, 2, 3]
    assert ranked[0].name == "edgekd:kd-cnn" and ranked[0].score == pytest.approx(0.0, abs=1e-9)
    assert all(c.within_budget and c.params > 0 and c.flops > 0 and c.latency_ms > 0 for c in ranked)
    again = rank_students(teacher, names, radio_data(), batch=16, seed=0)
    assert [(c.name, c.score) for c in again] == [(c.name, c.score) for c in ranked]


def test_budget_excludes_with_the_reason():
    teacher = seeded_model("edgekd:kd-cnn")
    names = ["edgekd:kd-mobilenet", "edgekd:kd-cnn"]
    flops = {c.name: c.flops for c in rank_students(teacher, names, radio_data(), batch=8)}
    limit = min(flops.values())
    ranked = rank_students(teacher, names, radio_data(), Budget(max_flops=limit), batch=8)
    kept, dropped = ranked
    assert kept.within_budget and kept.rank == 1 and kept.flops <= limit
    assert not dropped.within_budget and dropped.rank is None and dropped.score is None
    assert f"> --max-flops {limit:,}" in dropped.excluded_because
    slow = rank_students(teacher, names, radio_data(), Budget(max_latency_ms=1e-6), batch=8)
    assert all(c.score is None and "--max-latency-ms" in c.excluded_because for c in slow)


def test_bad_arguments_are_one_line_errors():
    teacher = seeded_model("edgekd:kd-cnn")
    with pytest.raises(ModelError, match="kd-cnnn"):
        rank_students(teacher, ["edgekd:kd-cnnn"], radio_data())
    with pytest.raises(RecipeError, match="--batch"):
        rank_students(teacher, ["edgekd:cnn"], radio_data(), batch=1)
    with pytest.raises(RecipeError, match="--max-flops"):
        Budget(max_flops=0)


def test_cli_unknown_candidate_is_one_line_before_any_training(tmp_path: Path):
    result = run_cli(
        "search-student",
        "--teacher",
        "timm:resnet18",
        "--data",
        "digits",
        "--candidates",
        "timm:resnet10t,timm:mobilenetv3_smal_100",
        "--set",
        f"runs_dir={tmp_path}",
    )
    assert_user_error(result, "timm:mobilenetv3_smal_100", "did you mean")
    assert not any(tmp_path.iterdir())  # failed before the teacher stage


def test_cli_ranks_and_writes_json(tmp_path: Path):
    from edgekd.models.checkpoint import save_checkpoint

    checkpoint = tmp_path / "teacher.pt"
    save_checkpoint(checkpoint, build_model("edgekd:kd-cnn", num_classes=11), "edgekd:kd-cnn", {})
    out = tmp_path / "search.json"
    result = run_cli(
        "search-student",
        "--teacher",
        "edgekd:kd-cnn",
        "--teacher-checkpoint",
        str(checkpoint),
        "--candidates",
        "edgekd:cnn,edgekd:kd-mobilenet",
        "--batch",
        "16",
        "--max-flops",
        "1000000000",
        "--out",
        str(out),
        "--set",
        f"runs_dir={tmp_path}",
        "--set",
        "data.frames_per_class_snr=1",
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "edgekd:kd-mobilenet" in result.stdout and "within budget" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["teacher"]["origin"] == str(checkpoint)
    assert saved["batch"] == 16 and saved["budget"]["max_flops"] == 1_000_000_000
    assert sorted(c["rank"] for c in saved["candidates"]) == [1, 2]
    scores = [c["score"] for c in saved["candidates"]]
    assert scores == sorted(scores) and all(s > 0 for s in scores)


def test_map_warning_flags_maps_with_too_few_positions():
    from edgekd.distill.search import MIN_POSITIONS, map_warning

    assert MIN_POSITIONS == 4
    assert map_warning("teacher", (2, 2)) is None and map_warning("teacher", (16,)) is None
    one = map_warning("teacher", (1, 1))
    assert one is not None and "1x1 (1 spatial position < 4)" in one and "data.image_size" in one
    assert "1x3 (3 spatial positions < 4)" in map_warning("candidate 'x'", (1, 3))


def image_data(side: int, frames: int = 12) -> tuple[ArrayDataset, ArrayDataset, DatasetMeta]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((frames, 3, side, side)).astype(np.float32)
    data = ArrayDataset(x, np.arange(frames) % CLASSES, None)
    meta = DatasetMeta("tiny-img", "classification", (3, side, side), ["a", "b", "c"], {}, "e" * 64, "test")
    return data, data, meta


@pytest.mark.parametrize(("side", "spatial"), [(32, [1, 1]), (64, [2, 2])])
def test_rank_students_warns_when_the_last_map_is_too_small(side: int, spatial: list[int]):
    torch.manual_seed(0)
    teacher = build_model("timm:resnet10t", num_classes=CLASSES, in_channels=3, input_shape=(3, side, side))
    lines: list[str] = []
    (ranked,) = rank_students(teacher, ["timm:resnet10t"], image_data(side), batch=4, log=lines.append)
    assert ranked.map_shape == spatial and ranked.score is not None
    warnings = [line for line in lines if line.startswith("[search] warning:")]
    if side == 32:  # ResNets reach 1x1 on 32x32 inputs: flagged for teacher and candidate, still scored
        assert "the teacher's last feature map is 1x1" in ranked.map_warning
        assert "candidate 'timm:resnet10t''s last feature map is 1x1" in ranked.map_warning
        assert len(warnings) == 2 and "teacher" in warnings[0]
        assert ranked.to_dict()["map_warning"] == ranked.map_warning  # goes into the JSON
    else:
        assert ranked.map_warning is None and not warnings
