"""Recipe loading: defaults, YAML, overrides and one-line errors for every kind of bad field."""

import json
from pathlib import Path

import pytest

from edgekd.errors import RecipeError
from edgekd.recipe import DEFAULT_RECIPE, Recipe, load_recipe


def test_default_recipe_file_matches_schema_defaults():
    """The shipped recipe documents every field; loading it gives the schema's defaults."""
    assert DEFAULT_RECIPE.is_file()
    assert load_recipe() == Recipe()


def test_default_recipe_file_lists_every_field():
    text = DEFAULT_RECIPE.read_text()
    for section in ("data", "teacher", "student", "distill", "export", "quantize", "profile"):
        for field in type(getattr(Recipe(), section)).model_fields:
            assert f"{field}:" in text, f"{section}.{field} missing from {DEFAULT_RECIPE.name}"


def test_patient_recipe_is_the_measured_patient_setting():
    """recipes/radio-patient.yaml is the default recipe plus exactly the overrides that
    benchmarks/results/kd_methods_patient.json measured, so the README's figures are this recipe's."""
    root = DEFAULT_RECIPE.parent.parent
    patient = load_recipe(root / "recipes" / "radio-patient.yaml")
    measured = json.loads((root / "benchmarks" / "results" / "kd_methods_patient.json").read_text())
    overrides = measured["tasks"]["radio"]["overrides"]
    assert patient == load_recipe(None, [*overrides, "name=radio-patient"])
    assert patient.distill.train.epochs == 150 and patient.distill.augment.variants == 16
    assert patient.distill.train.batch_size == Recipe().distill.train.batch_size  # the rest: defaults


def test_overrides_are_typed_and_nested(tmp_path: Path):
    recipe = load_recipe(None, ["distill.train.epochs=3", "distill.method=kd", "seed=7", "profile.threads=1"])
    assert recipe.distill.train.epochs == 3 and recipe.distill.method == "kd"
    assert recipe.seed == 7 and recipe.profile.threads == 1


def test_yaml_file_and_override_precedence(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text("name: mine\ndistill:\n  temperature: 2.0\n")
    recipe = load_recipe(path, ["distill.temperature=3"])
    assert recipe.name == "mine" and recipe.distill.temperature == 3.0
    assert recipe.run_dir == Path("models/runs/mine")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            "distill:\n  temprature: 3\n",
            "unknown field 'distill.temprature'; did you mean 'distill.temperature'?",
        ),
        ("dsitill: {}\n", "did you mean 'distill'?"),
        ("distill:\n  temperature: -1\n", "'distill.temperature' = -1"),
        ("seed: [1, 2]\n", "'seed'"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("name: [unclosed\n", "malformed YAML"),
    ],
)
def test_bad_recipe_is_one_clear_line(tmp_path: Path, content: str, expected: str):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_missing_recipe_file(tmp_path: Path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_bad_override_syntax():
    with pytest.raises(RecipeError, match="FIELD=VALUE"):
        load_recipe(None, ["distill.epochs"])


def test_the_shipped_teacher_is_the_default_only_for_its_own_task():
    from edgekd.api import check_builtin_teacher
    from edgekd.errors import RecipeError
    from edgekd.recipe import BUILTIN_TEACHERS

    shipped = BUILTIN_TEACHERS / "clst-radio-synthetic.safetensors"
    assert shipped.is_file() and shipped.with_suffix(".json").is_file()
    assert load_recipe().teacher.checkpoint == shipped
    assert load_recipe(None, ["data.frames_per_class_snr=2"]).teacher.checkpoint == shipped
    assert load_recipe(None, ["data.name=digits"]).teacher.checkpoint is None  # trained on the labels
    assert load_recipe(None, ["teacher.model=timm:resnet18"]).teacher.checkpoint is None
    assert load_recipe(None, ["teacher.checkpoint=null"]).teacher.checkpoint is None
    explicit = load_recipe(None, ["data.name=digits", "teacher.checkpoint=builtin:clst-radio-synthetic"])
    with pytest.raises(RecipeError, match=r"shipped teacher for data.name=radio-synthetic, not digits"):
        check_builtin_teacher(explicit)
    shipped_names = r"clst-radio-synthetic, detr-mnv3l-scenes, detr-r18-scenes"
    with pytest.raises(RecipeError, match=rf"no shipped teacher 'nope'; shipped: {shipped_names}"):
        load_recipe(None, ["teacher.checkpoint=builtin:nope"])
    from edgekd import teachers  # the benchmarks resolve builtin:NAME through the same function

    assert teachers.resolve("builtin:clst-radio-synthetic") == shipped
    assert teachers.resolve("runs/teacher.pt") == Path("runs/teacher.pt")
    with pytest.raises(ValueError, match=rf"no shipped teacher 'nope'; shipped: {shipped_names}"):
        teachers.resolve("builtin:nope")
