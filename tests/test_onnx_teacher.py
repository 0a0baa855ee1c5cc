"""A teacher the user has only as ONNX (``onnx:FILE``, issue 11): run by ONNX Runtime, cached, checked.

The ONNX teacher exported from the test model file's ``big`` distils its ``small`` student, and the
teacher cache holds the same logits and embeddings as the PyTorch teacher; an input shape that does
not fit the data, a feature-map method, or an ONNX student are each one line with exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekd.api import compress
from edgekd.data import build_dataset
from edgekd.models import build_model
from edgekd.models.onnx_teacher import FrozenLinear, OnnxTeacher
from edgekd.recipe import load_recipe
from tests.assets.user_models import big
from tests.test_bad_input import cli, one_error_line

USER_FILE = "tests/assets/user_models.py"
BIG, SMALL = f"py:{USER_FILE}:big", f"py:{USER_FILE}:small"
CLASSES = 11  # radio-synthetic's modulations
SMALL_DATA = ["data.frames_per_class_snr=2"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def _export(model: nn.Module, path: Path, shape: tuple[int, ...], dynamic: bool = True) -> Path:
    model.eval()
    torch.onnx.export(
        model,
        (torch.randn(2, *shape),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None,
    )
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    teacher = big(CLASSES).eval()
    return teacher, _export(teacher, tmp_path_factory.mktemp("onnx") / "big.onnx", (2, 128))


def test_the_onnx_teacher_has_no_parameters_and_exposes_the_classifier_input(exported) -> None:
    torch_teacher, path = exported
    teacher = build_model(f"onnx:{path}", CLASSES, 2, role="teacher", input_shape=(2, 128))
    assert isinstance(teacher, OnnxTeacher) and list(teacher.parameters()) == []
    assert isinstance(teacher.head, FrozenLinear) and teacher.feature_dim == 32 and teacher.hint_layers == ()
    x = torch.randn(5, 2, 128)
    with torch.no_grad():
        expected = torch_teacher(x)
    torch.testing.assert_close(teacher(x), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(teacher.head(teacher.forward_features(x)), expected, atol=1e-4, rtol=1e-4)


def test_a_graph_without_a_final_linear_gives_its_logits_as_embedding(tmp_path, capsys) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 3), nn.LogSoftmax(dim=1))
    path = _export(model, tmp_path / "logsoftmax.onnx", (2, 4))
    teacher = OnnxTeacher(path, 3, (2, 4))
    assert teacher.feature_dim == 3 and "see its logits as the embedding" in capsys.readouterr().out
    x = torch.randn(4, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(teacher.forward_features(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_fixed_batch_axis_is_served_in_chunks(tmp_path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 3)).eval()
    path = _export(model, tmp_path / "fixed.onnx", (2, 4), dynamic=False)  # batch fixed at 2
    teacher = OnnxTeacher(path, 3, (2, 4))
    x = torch.randn(5, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model(x), atol=1e-5, rtol=1e-5)


def test_an_onnx_teacher_distils_a_user_student_through_the_teacher_cache(exported, tmp_path) -> None:
    torch_teacher, path = exported
    recipe = load_recipe(
        None,
        [
            f"teacher.model=onnx:{path}",
            f"student.model={SMALL}",
            "distill.method=kd",
            "distill.train.epochs=1",
            f"runs_dir={tmp_path}/runs",
            *SMALL_DATA,
        ],
    )
    results = compress(recipe, until="distill", log=lambda _line: None)
    stage = results["teacher"]
    assert stage["origin"] == f"ONNX file {path}" and stage["model_file"].endswith("teacher.onnx")
    assert (recipe.run_dir / stage["model_file"]).read_bytes() == path.read_bytes()
    assert stage["params"] > 0 and 0 <= stage["val_accuracy"] <= 1
    distill = results["distill"]
    assert distill["teacher_cache"]["used"] and len(distill["history"]) == 1
    cache = tmp_path / "cache" / "teacher" / distill["teacher_cache"]["key"]
    entry = json.loads((cache / "entry.json").read_text(encoding="utf-8"))
    logits, features = np.load(cache / "logits.npy"), np.load(cache / "features.npy")
    assert entry["logits"]["shape"][2] == CLASSES and features.shape[2] == 32
    x = torch.from_numpy(build_dataset(recipe.data, seed=recipe.seed)[0].x)
    adapter = build_model(BIG, CLASSES, 2, role="teacher", input_shape=(2, 128))
    adapter.load_state_dict(adapter.adapt_state_dict(torch_teacher.state_dict()))
    with torch.no_grad():
        np.testing.assert_allclose(logits[0], torch_teacher(x).numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(
            features[0], adapter.eval().forward_features(x).numpy(), atol=1e-4, rtol=1e-4
        )


def _compress(monkeypatch, capsys, tmp_path, *args: str) -> tuple[int, str, str]:
    return cli(
        monkeypatch,
        capsys,
        "compress",
        *args,
        "--set",
        SMALL_DATA[0],
        "--epochs",
        "1",
        "--set",
        f"runs_dir={tmp_path}/runs",
    )


def test_an_onnx_teacher_for_other_inputs_is_one_line(monkeypatch, capsys, tmp_path) -> None:
    torch.manual_seed(0)
    path = _export(big(CLASSES), tmp_path / "short.onnx", (2, 64), dynamic=False)
    code, _, err = _compress(monkeypatch, capsys, tmp_path, "--teacher", f"onnx:{path}", "--until", "teacher")
    one_error_line(code, err, "takes inputs of shape (2, 2, 64)", "the data gives (batch, 2, 128)")
    assert not (tmp_path / "runs").exists()


def test_a_feature_map_method_with_an_onnx_teacher_is_refused_in_one_line(
    exported, monkeypatch, capsys, tmp_path
) -> None:
    _, path = exported
    code, _, err = _compress(monkeypatch, capsys, tmp_path, "--teacher", f"onnx:{path}", "--method", "at")
    one_error_line(
        code, err, "method at needs the teacher's feature maps, which an ONNX teacher", "(kd, skd, dkd, ...)"
    )
    assert not (tmp_path / "runs").exists()


def test_an_onnx_student_or_teacher_checkpoint_is_one_line(exported, monkeypatch, capsys, tmp_path) -> None:
    _, path = exported
    code, _, err = _compress(monkeypatch, capsys, tmp_path, "--student", f"onnx:{path}")
    one_error_line(code, err, "cannot be trained as a student", f"edgekd deploy {path}")
    code, _, err = _compress(
        monkeypatch, capsys, tmp_path, "--teacher", f"onnx:{path}", "--teacher-checkpoint", str(path)
    )
    one_error_line(code, err, "teacher.checkpoint: an ONNX teacher", "carries its own weights")
    code, _, err = _compress(monkeypatch, capsys, tmp_path, "--teacher", f"onnx:{tmp_path}/none.onnx")
    one_error_line(code, err, "none.onnx not found")
