"""Target files: each shipped one validates, aliases resolve, a bad file is one error; `edgekd targets`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgekd.errors import RecipeError
from edgekd.targets import TARGETS_DIR, load_targets, read_target, resolve_target
from tests.test_cli import assert_user_error, run_cli

JETSONS = {"jetson-orin-nano": 0, "jetson-orin-nx": 2, "jetson-agx-orin": 2}  # name -> DLA cores


def test_every_target_file_validates() -> None:
    targets = load_targets()
    assert {*JETSONS, "raspberry-pi-5", "x86-ort", "x86-openvino"} <= set(targets)
    assert len(targets) == len(list(TARGETS_DIR.glob("*.yaml")))


@pytest.mark.parametrize("name,dla", sorted(JETSONS.items()))
def test_jetson_targets(name: str, dla: int) -> None:
    target = resolve_target(name)
    assert target.backend == "tensorrt" and target.arch == "aarch64"
    assert set(target.precisions) == {"fp32", "fp16", "int8"}
    assert target.dla_cores == dla
    assert target.gpu["architecture"] == "Ampere" and target.gpu["cuda_cores"] == 128 * target.gpu["sm_count"]
    assert {"jetpack", "tensorrt", "cuda"} <= set(target.software)
    specs = target.specs
    assert specs["peak_int8_tops"] == pytest.approx(2 * specs["peak_fp16_tflops"])  # dense INT8 = 2x FP16
    assert (specs["dla_int8_tops"] > 0) == (dla > 0)
    # Dense figures: NVIDIA's published sparse totals (40 / 100 / 275 TOPS) are twice these.
    published_sparse = {"jetson-orin-nano": 40, "jetson-orin-nx": 100, "jetson-agx-orin": 275}[name]
    assert 2 * (specs["peak_int8_tops"] + specs["dla_int8_tops"]) == pytest.approx(published_sparse)


def test_raspberry_pi_and_aliases() -> None:
    pi = resolve_target("rpi5")
    assert pi.name == "raspberry-pi-5" and pi.backend == "onnxruntime" and pi.arch == "aarch64"
    assert pi.cpu == {"model": "Arm Cortex-A76", "cores": 4, "max_clock_ghz": 2.4}
    assert resolve_target("jetson").name == "jetson-orin-nano"
    assert resolve_target("cpu").name == "x86-ort"
    assert resolve_target("openvino").name == "x86-openvino"
    with pytest.raises(RecipeError, match="unknown target 'jetsn'.*did you mean 'jetson'"):
        resolve_target("jetsn")


DROP = object()  # a field left out of the file
GOOD = {
    "name": "my-board",
    "backend": "tensorrt",
    "precisions": ["fp16", "int8"],
    "arch": "arm64",
    "gpu": {"architecture": "Ampere", "sm_count": 8, "cuda_cores": 1024},
    "dla_cores": 2,
}


def _write(folder: Path, data: dict, name: str = "board.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_good_custom_file_normalises_arm64(tmp_path: Path) -> None:
    target = read_target(_write(tmp_path, GOOD))
    assert target.arch == "aarch64" and target.dla_cores == 2 and target.specs["peak_int8_tops"] is None


@pytest.mark.parametrize(
    "change,fragments",
    [
        ({"backend": "tensorrtt"}, ["'tensorrtt' is not one of", "tensorrt"]),
        ({"precisions": ["int4"]}, ["precisions.0", "'int4'"]),
        ({"precisions": []}, ["precisions"]),
        ({"arch": "riscv"}, ["arch", "x86_64 or aarch64"]),
        ({"dla_cores": -1}, ["dla_cores"]),
        ({"gpu": DROP}, ["needs a gpu section"]),
        ({"backend": "onnxruntime", "gpu": DROP, "precisions": ["fp32"]}, ["dla_cores 2 needs backend"]),
        ({"backend": "onnxruntime", "dla_cores": 0}, ["'fp16'", "not built by backend 'onnxruntime'"]),
        ({"gpu": {"architecture": "Ampere", "sm_count": 0, "cuda_cores": 1}}, ["gpu.sm_count"]),
        ({"specs": {"peak_int8_tops": -3}}, ["specs.peak_int8_tops"]),
        ({"specs": {"peak_int8_gops": 3}}, ["unknown field 'specs.peak_int8_gops'"]),
        ({"name": DROP}, ["missing field 'name'"]),
        ({"name": "My Board"}, ["field 'name' = 'My Board'"]),
    ],
)
def test_bad_target_file_is_one_clear_error(tmp_path: Path, change: dict, fragments: list[str]) -> None:
    data = {key: value for key, value in {**GOOD, **change}.items() if value is not DROP}
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError) as error:
        read_target(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"target file {path}: ")
    for fragment in fragments:
        assert fragment in message, message


def test_malformed_yaml_and_duplicate_alias(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="malformed YAML"):
        load_targets(tmp_path)
    (tmp_path / "bad.yaml").unlink()
    _write(tmp_path, {**GOOD, "aliases": ["jetson"]}, "a.yaml")
    _write(tmp_path, {**GOOD, "name": "other", "aliases": ["jetson"]}, "b.yaml")
    with pytest.raises(RecipeError, match="alias 'jetson' is already used by"):
        load_targets(tmp_path)


def test_targets_command_lists_every_target_with_reasons() -> None:
    result = run_cli("targets")
    assert result.returncode == 0, result.stderr
    for target in load_targets().values():
        assert target.name in result.stdout
        problems = target.host_problems()
        if problems:  # each reason, on its own line after the table
            assert f"why not here: {target.name}: {'; '.join(problems)}" in result.stdout
    nano = resolve_target("jetson").host_problems()
    if nano:  # this host cannot build engines: the table says a bundle is still made
        assert "bundle + build script only" in result.stdout


def test_dla_core_on_a_target_without_dla_stops_before_training(tmp_path: Path) -> None:
    assert_user_error(
        run_cli(
            "compress", "--target", "jetson", "--set", "compile.dla_core=0", "--set", f"runs_dir={tmp_path}"
        ),
        "compile.dla_core=0",
        "jetson-orin-nano has 0 DLA core(s)",
    )
    assert not any(tmp_path.iterdir())  # nothing trained or written
