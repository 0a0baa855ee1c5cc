"""Model sources beyond the zoo (issue 11): ``py:FILE.py:FACTORY``, ``module:FACTORY``, ``torchvision:``.

Each builds behind edgekd's interface (``forward == head(forward_features)``), trains, takes the
distillation heads of DHO and LeLP, finds or takes hint layers, loads the user's own state_dict,
reruns the teacher stage when its file changes, and each bad factory is one line with exit 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekd.distill.methods import ModelOutputs, build_method
from edgekd.distill.outputs import model_outputs, probe_shape
from edgekd.errors import ModelError, RecipeError
from edgekd.models import build_model, model_factory, model_source_files
from edgekd.models.checkpoint import load_weights, save_checkpoint
from edgekd.models.sources import LogitsHead, UserModel
from edgekd.pipeline import RunContext, fingerprint
from edgekd.recipe import DistillSpec, load_recipe
from edgekd.stages import teacher as teacher_stage
from tests.assets.user_models import SequenceNet
from tests.test_bad_input import cli, one_error_line

USER_FILE = "tests/assets/user_models.py"
BIG, SMALL = f"py:{USER_FILE}:big", f"py:{USER_FILE}:small"
IQ = (2, 128)
CLASSES = 11

SEQUENTIAL_CNN = """
from torch import nn

def cnn(num_classes, in_channels=3):
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, num_classes),
    )

def log_probs(num_classes, in_channels=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 16 * 16, num_classes), nn.LogSoftmax(dim=1))
"""


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def _train_step(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """One SGD step on random data; returns how far the weights moved."""
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, *input_shape), torch.arange(4) % CLASSES
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimiser.step()
    return sum(float((p.detach() - b).abs().sum()) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        (BIG, IQ),
        ("tests.assets.user_models:small", IQ),
        ("torchvision:resnet18", (3, 32, 32)),
    ],
)
def test_each_source_builds_behind_the_interface_and_trains(name, shape) -> None:
    torch.manual_seed(0)
    model = build_model(name, CLASSES, shape[0], role="student", input_shape=shape)
    assert isinstance(model, UserModel) and model.input_rank == len(shape)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == CLASSES
    model.eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (3, CLASSES)
        torch.testing.assert_close(logits, model.head(model.forward_features(x)))
        assert model.forward_features(x).shape == (3, model.feature_dim)
    assert _train_step(model, shape) > 0


def test_the_adapter_reproduces_the_user_model_and_loads_its_state_dict(tmp_path) -> None:
    torch.manual_seed(1)
    original = SequenceNet(CLASSES, width=32, recurrent="lstm").eval()
    file = tmp_path / "mine.pt"
    torch.save(original.state_dict(), file)  # what a user has: their own model.state_dict()
    model = build_model(BIG, CLASSES, 2, role="teacher", input_shape=IQ)
    load_weights(model, file, BIG)
    model.eval()
    x = torch.randn(5, *IQ)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x))
    assert set(model.adapt_state_dict(original.state_dict())) == set(model.state_dict())
    # An edgekd checkpoint of the adapter round-trips too.
    save_checkpoint(tmp_path / "teacher.pt", model, BIG)
    again = build_model(BIG, CLASSES, 2, role="teacher", input_shape=IQ)
    load_weights(again, tmp_path / "teacher.pt", BIG)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), original(x))


def test_factory_kwargs_and_in_channels_reach_the_factory(tmp_path) -> None:
    file = tmp_path / "cnn.py"
    file.write_text(SEQUENTIAL_CNN, encoding="utf-8")
    model = build_model(f"py:{file}:cnn", 5, in_channels=1, input_shape=(1, 16, 16))
    assert model.net[0].in_channels == 1  # the factory takes in_channels: it was passed
    narrow = build_model(SMALL, CLASSES, 2, input_shape=IQ, kwargs={"width": 8})
    assert narrow.feature_dim == 8


def test_dho_and_lelp_replace_the_head_of_a_user_model() -> None:
    torch.manual_seed(2)
    x, labels = torch.randn(24, *IQ), torch.arange(24) % CLASSES
    teacher = build_model(BIG, CLASSES, 2, role="teacher", input_shape=IQ).eval()
    with torch.no_grad():
        teacher_outputs = model_outputs(teacher, x, features=True, feature_maps=False)
    for name in ("dho", "lelp"):
        student = build_model(SMALL, CLASSES, 2, role="student", input_shape=IQ)
        method = build_method(
            DistillSpec(method=name), CLASSES, probe_shape(student, IQ), probe_shape(teacher, IQ)
        )
        old_head = student.head
        method.prepare(student, labels, ModelOutputs(teacher_outputs.logits, teacher_outputs.features))
        assert student.head is not old_head, name
        with torch.no_grad():
            out = student.eval()(x[:3])
        assert out.shape == (3, CLASSES) and torch.isfinite(out).all(), name
        torch.testing.assert_close(out, student.head(student.forward_features(x[:3])))


def test_hint_layers_are_the_stage_ends_of_a_sequential_cnn_and_of_the_sequence_net(tmp_path) -> None:
    file = tmp_path / "cnn.py"
    file.write_text(SEQUENTIAL_CNN, encoding="utf-8")
    cnn = build_model(f"py:{file}:cnn", 5, 3, input_shape=(3, 16, 16))
    # runs of equal size: conv+relu at 16x16, pool+conv+relu at 8x8, pool at 4x4 (then flat)
    assert cnn.hint_layers == ("net.1", "net.4", "net.5")
    assert probe_shape(cnn, (3, 16, 16)).map_shapes == ((8, 16, 16), (16, 8, 8), (16, 4, 4))
    net = build_model(BIG, CLASSES, 2, input_shape=IQ)
    assert net.hint_layers == ("net.stem", "net.block")  # the recurrent/attention outputs are not maps
    assert probe_shape(net, IQ).map_shapes == ((32, 128), (32, 64))


def test_named_hint_layers_are_used_and_unknown_ones_list_close_names() -> None:
    model = build_model(BIG, CLASSES, 2, input_shape=IQ, hint_layers=["stem.2", "block.1"])
    assert model.hint_layers == ("net.stem.2", "net.block.1")
    assert probe_shape(model, IQ).map_shapes == ((32, 128), (32, 128))
    with pytest.raises(
        RecipeError, match=r"teacher.hint_layers: 'blok' is not a module .*close names: block"
    ):
        build_model(BIG, CLASSES, 2, role="teacher", input_shape=IQ, hint_layers=["blok"])
    timm_like = build_model("edgekd:kd-cnn", CLASSES, 2, input_shape=IQ, hint_layers=["features.0"])
    assert timm_like.hint_layers == ("features.0",)


def test_a_model_whose_logits_pass_log_softmax_keeps_its_output_with_an_identity_head(
    tmp_path, capsys
) -> None:
    file = tmp_path / "cnn.py"
    file.write_text(SEQUENTIAL_CNN, encoding="utf-8")
    model = build_model(f"py:{file}:log_probs", 4, 3, input_shape=(3, 16, 16))
    assert isinstance(model.head, LogitsHead) and model.feature_dim == 4
    assert "embedding-based methods see its logits" in capsys.readouterr().out
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model.eval()(x)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2))  # still the user's log-probabilities


def test_model_source_files_and_the_teacher_stage_fingerprint_follow_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text(
        "from torch import nn\n\ndef big(num_classes):\n    return nn.Linear(4, num_classes)\n"
    )
    name = "py:mine.py:big"
    assert model_source_files(name) == [Path("mine.py")]
    assert model_source_files("edgekd:clst") == []
    recipe = load_recipe(None, [f"teacher.model={name}", f"runs_dir={tmp_path}/runs"])
    ctx = RunContext(recipe=recipe, run_dir=recipe.run_dir)
    before = fingerprint(teacher_stage.STAGE, ctx)
    assert fingerprint(teacher_stage.STAGE, ctx) == before
    (tmp_path / "mine.py").write_text(
        "from torch import nn\n\ndef big(num_classes):\n    return nn.Linear(4, num_classes, bias=False)\n"
    )
    assert fingerprint(teacher_stage.STAGE, ctx) != before
    assert build_model(name, 3, 4).net.bias is None  # the edited file is the one imported


def test_unknown_sources_are_model_errors_with_what_to_do() -> None:
    with pytest.raises(ModelError, match=r"has no function 'bigg'; did you mean 'big'\? it defines: .*small"):
        model_factory(f"py:{USER_FILE}:bigg")
    with pytest.raises(ModelError, match="module 'no_such_pkg.models' is not importable"):
        model_factory("no_such_pkg.models:big")
    with pytest.raises(ModelError, match="did you mean torchvision:resnet18"):
        model_factory("torchvision:resnet19")
    with pytest.raises(ModelError, match="expected py:path/to/model.py:FACTORY"):
        model_factory(f"py:{USER_FILE}")


BAD_FACTORIES = [
    ("raises", "the factory raised ValueError: width must be even"),
    ("not_a_module", "returned a dict, not a torch.nn.Module"),
    ("wrong_width", "(14 per sample), but the data has 11 classes"),
    ("missing", "has no function 'missing'"),
]


@pytest.mark.parametrize(("factory", "fragment"), BAD_FACTORIES)
@pytest.mark.parametrize("role", ["teacher", "student"])
def test_each_bad_factory_is_one_line_from_the_cli(
    monkeypatch, capsys, tmp_path, factory, fragment, role
) -> None:
    code, _, err = cli(
        monkeypatch,
        capsys,
        "compress",
        f"--{role}",
        f"py:{USER_FILE}:{factory}",
        "--set",
        "data.frames_per_class_snr=2",
        "--epochs",
        "1",
        "--set",
        f"runs_dir={tmp_path}/runs",
    )
    one_error_line(code, err, fragment)
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def test_a_missing_model_file_is_one_line_from_the_cli(monkeypatch, capsys, tmp_path) -> None:
    code, _, err = cli(
        monkeypatch,
        capsys,
        "compress",
        "--teacher",
        "py:nowhere/mine.py:big",
        "--set",
        f"runs_dir={tmp_path}",
    )
    one_error_line(code, err, "nowhere/mine.py not found", "py:FILE.py:FACTORY")


def test_user_teacher_and_student_distil_through_the_cli(monkeypatch, capsys, tmp_path) -> None:
    runs = tmp_path / "runs"
    args = ["compress", "--teacher", BIG, "--student", SMALL, "--method", "fitnets", "--until", "distill"]
    args += ["--set", "data.frames_per_class_snr=2", "--epochs", "1", "--set", f"runs_dir={runs}"]
    args += ["--set", "student.kwargs.width=8"]
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    run = next(runs.iterdir())
    student = torch.load(next(run.glob("*distill/student.pt")), weights_only=True)
    assert student["model"] == SMALL and student["state_dict"]["head.weight"].shape == (CLASSES, 8)
    teacher = torch.load(next(run.glob("*teacher/teacher.pt")), weights_only=True)
    assert teacher["model"] == BIG and np.isfinite(teacher["state_dict"]["head.weight"].numpy()).all()
