"""The bundle of a real (tiny) run: manifest, checksums, a C array gcc compiles, verify, tampering."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgekd.api import bundle as write_bundle
from edgekd.api import compress
from edgekd.bundle.checksums import MANIFEST_FILE, SUMS_FILE
from edgekd.bundle.verify import verify_bundle
from edgekd.errors import BundleError, RecipeError
from edgekd.hashing import sha256_file
from tests.test_cli import assert_user_error, run_cli

TINY = [
    "data.frames_per_class_snr=2",
    "data.snr_min=10",
    "data.snr_max=18",
    "teacher.train.epochs=1",
    "distill.train.epochs=1",
    "quantize.calibration_samples=32",
    "profile.iterations=5",
    "profile.warmup=1",
    "profile.threads=1",
    "bundle.eval_samples=40",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run of the whole pipeline on very little data (no remote device)."""
    runs = tmp_path_factory.mktemp("runs")
    compress(None, [f"runs_dir={runs}", "name=tiny", *TINY], log=lambda _: None)
    return runs / "tiny"


@pytest.fixture
def bundle(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the run's bundle (tests may tamper with it)."""
    return Path(shutil.copytree(tiny_run / "bundle" / "x86-ort", tmp_path / "x86-ort"))


def test_manifest_describes_artifacts_preprocessing_quantisation(tiny_run: Path, bundle: Path):
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    report = json.loads((tiny_run / "report.json").read_text())
    assert report["bundle"] == "bundle/x86-ort"
    assert manifest["target"]["name"] == "x86-ort" and manifest["tool"]["name"] == "edgekd"
    assert manifest["runtimes"]["onnxruntime"] and manifest["created"]
    assert [a["file"] for a in manifest["artifacts"]] == ["student.fp32.onnx", "student.int8.onnx"]
    assert manifest["inputs"] == [
        {
            "name": manifest["inputs"][0]["name"],
            "shape": [manifest["inputs"][0]["shape"][0], 2, 128],
            "dtype": "float32",
        }
    ]
    assert manifest["outputs"][0]["shape"][1] == 11 and manifest["outputs"][0]["dtype"] == "float32"
    graph = onnx.load(str(bundle / "student.int8.onnx")).graph
    assert manifest["inputs"][0]["name"] == graph.input[0].name
    assert manifest["labels"] == report["data"]["classes"] and len(manifest["labels"]) == 11
    assert manifest["preprocessing"] == report["data"]["normalisation"]
    assert manifest["training"] == {"method": report["student"]["method"], "augmentation": None}
    quant = next(entry for entry in manifest["artifacts"] if entry["precision"] == "int8")["quantization"]
    assert quant["scheme"] == "QDQ" and quant["per_channel"] is True
    assert quant["symmetric_activations"] is False and quant["calibration"]["samples_used"] == 32
    assert quant["calibration"]["dataset_fingerprint"] == report["data"]["fingerprint"]
    # the deployment decision (fastest within the budget, measured) names the embedded artifact
    assert manifest["firmware"]["artifact"] == manifest["deployment"]["file"] == report["deployment"]["file"]
    assert manifest["firmware"]["alignment"] == 16
    frames = min(40, report["data"]["eval_frames"])
    assert manifest["eval_set"]["frames"] == frames
    with np.load(bundle / "eval.npz") as arrays:
        assert arrays["x"].shape == (frames, 2, 128) and arrays["y"].shape == (frames,)


def test_checksums_cover_every_file(bundle: Path):
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    files = {p.name for p in bundle.iterdir()}
    assert set(manifest["files"]) == files - {MANIFEST_FILE, SUMS_FILE}
    for name, digest in manifest["files"].items():
        assert sha256_file(bundle / name) == digest
    sums = dict(line.split("  ")[::-1] for line in (bundle / SUMS_FILE).read_text().splitlines())
    assert set(sums) == files - {SUMS_FILE} and sums[MANIFEST_FILE] == sha256_file(bundle / MANIFEST_FILE)
    assert subprocess.run(["sha256sum", "--check", "--quiet", SUMS_FILE], cwd=bundle).returncode == 0


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_c_array_compiles_and_equals_the_artifact(bundle: Path, tmp_path: Path):
    # the deployed artifact is the one measured fastest (INT8 or FP32, depending on this machine's load)
    deployed = json.loads((bundle / MANIFEST_FILE).read_text())["firmware"]["artifact"]
    artifact = (bundle / deployed).read_bytes()
    source = (bundle / "model_data.c").read_text()
    assert sha256_file(bundle / deployed) in source and "aligned(16)" in source
    header = (bundle / "model_data.h").read_text()
    assert "#ifndef EDGEKD_MODEL_DATA_H_" in header and "extern const unsigned int model_data_len;" in header
    obj = tmp_path / "model_data.o"
    subprocess.run(
        ["gcc", "-std=c11", "-Wall", "-Werror", "-c", str(bundle / "model_data.c"), "-o", str(obj)],
        check=True,
    )
    symbols = subprocess.run(["nm", "-S", str(obj)], capture_output=True, text=True, check=True).stdout
    sizes = {
        line.split()[-1]: int(line.split()[1], 16) for line in symbols.splitlines() if len(line.split()) == 4
    }
    assert sizes["model_data"] == len(artifact)
    main = tmp_path / "main.c"
    main.write_text(
        '#include <stdio.h>\n#include <stdint.h>\n#include "model_data.h"\n'
        "int main(void) {\n"
        '  printf("%u %u\\n", model_data_len, (unsigned)((uintptr_t)model_data % 16));\n'
        '  for (unsigned i = 0; i < model_data_len; i++) printf("%02x", model_data[i]);\n'
        '  printf("\\n");\n  return 0;\n}\n'
    )
    program = tmp_path / "main"
    subprocess.run(
        ["gcc", "-std=c11", "-Wall", "-Werror", f"-I{bundle}", str(main), str(obj), "-o", str(program)],
        check=True,
    )
    length, alignment, dump = subprocess.run(
        [str(program)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert int(length) == len(artifact) and alignment == "0"
    assert bytes.fromhex(dump) == artifact


def test_verify_clean_bundle_loads_and_runs_each_artifact(bundle: Path):
    rows = dict(verify_bundle(bundle))
    assert "match" in rows["checksums"] and "bytes ==" in rows["model_data.c"]
    assert rows["student.int8.onnx"].startswith("ran 1 input (1, 2, 128) on onnxruntime: output (1, 11)")
    result = run_cli("verify-bundle", str(bundle))
    assert result.returncode == 0 and "student.fp32.onnx" in result.stdout


@pytest.mark.parametrize("name", ["student.int8.onnx", MANIFEST_FILE, "model_data.c", "eval.npz"])
def test_one_changed_byte_is_detected_naming_the_file(bundle: Path, name: str):
    path = bundle / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        verify_bundle(bundle)
    result = run_cli("verify-bundle", str(bundle))
    assert result.returncode == 2 and name in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_added_file_is_detected(bundle: Path):
    (bundle / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="extra.bin: not listed"):
        verify_bundle(bundle)


def test_bundle_command_rebuilds_with_another_artifact(tiny_run: Path):
    result = run_cli("bundle", str(tiny_run), "--target", "cpu", "--artifact", "fp32")
    assert result.returncode == 0, result.stderr
    directory = tiny_run / "bundle" / "x86-ort"
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    assert manifest["firmware"]["artifact"] == "student.fp32.onnx" and manifest["quantization"] is None
    assert not list(directory.parent.glob(".*"))  # no temp or old directory left behind
    verify_bundle(directory)
    with pytest.raises(RecipeError, match="built fp32, int8"):
        write_bundle(tiny_run, precision="fp16")
    with pytest.raises(RecipeError, match="compiled for target x86-ort, not x86-openvino"):
        write_bundle(tiny_run, target="x86-openvino")
    write_bundle(tiny_run)  # back to the deployment decision for the other tests


def test_truncated_c_array_is_caught_and_a_rebuild_replaces_it(tiny_run: Path, tmp_path: Path):
    directory = tiny_run / "bundle" / "x86-ort"
    source = directory / "model_data.c"
    source.write_bytes(source.read_bytes()[: source.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(BundleError, match="model_data.c: SHA-256 differs"):
        verify_bundle(directory)
    assert_user_error(run_cli("verify-bundle", str(directory)), "model_data.c")
    write_bundle(tiny_run)  # rebuilt from the compile stage's artifacts, never from the old bundle
    rows = dict(verify_bundle(directory))
    chosen = json.loads((directory / MANIFEST_FILE).read_text())["deployment"]["file"]
    artifact = (directory / chosen).read_bytes()
    assert rows["model_data.c"] == f"{len(artifact)} bytes == {chosen}, the deployed artifact"


def test_truncated_int8_model_reaching_compile_is_one_line(tiny_run: Path, tmp_path: Path):
    """A QDQ model cut short after the quantize stage finished: compile must not compile what is left.
    Either the pipeline notices the stage output changed and quantises again (exit 0), or compile
    stops with one line naming the file and the stage to rerun; never a protobuf traceback."""
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "tiny")
    int8 = next((runs / "tiny").glob("*-quantize/student.int8.onnx"))
    int8.write_bytes(int8.read_bytes()[: int8.stat().st_size // 2])
    args = ["compress", "--set", f"runs_dir={runs}", "--set", "name=tiny"]
    for item in TINY:
        args += ["--set", item]
    result = run_cli(*args)
    if result.returncode != 0:
        assert_user_error(result, str(int8), "truncated or damaged", "rerun with --force quantize")
        result = run_cli(*args, "--force", "quantize")
    assert result.returncode == 0, result.stderr
    onnx.checker.check_model(str(int8))
    verify_bundle(runs / "tiny" / "bundle" / "x86-ort")
