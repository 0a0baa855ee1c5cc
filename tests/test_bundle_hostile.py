"""verify-bundle on hostile bundles: paths out of the bundle, symlinks, malformed manifests, truncation.

The bundles are made here in the format edgekd.bundle.build writes (a tiny real ONNX model, its C
array, manifest.json, SHA256SUMS), then tampered with and *resealed* (manifest and checksums
rewritten to match), as someone who hands out a bundle could: the checksums prove nothing then,
and every other check must hold on its own.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekd.bundle import carray
from edgekd.bundle.checksums import MANIFEST_FILE, SUMS_FILE, render_sums
from edgekd.bundle.verify import MAX_SAMPLE_ELEMENTS, verify_bundle
from edgekd.errors import BundleError
from edgekd.hashing import sha256_file
from tests.test_cli import assert_user_error, run_cli

MODEL = "student.fp32.onnx"


def tiny_onnx(path: Path) -> None:
    """logits = input @ W + b: (batch, 4) -> (batch, 3), float32."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_c_array(directory: Path, artifact: str) -> dict[str, Any]:
    data = (directory / artifact).read_bytes()
    digest = sha256_file(directory / artifact)
    (directory / carray.HEADER_FILE).write_text(carray.render_header(artifact, digest, len(data), "test"))
    (directory / carray.SOURCE_FILE).write_text(carray.render_source(data, artifact, digest, "test"))
    return {
        "artifact": artifact,
        "precision": "fp32",
        "header": carray.HEADER_FILE,
        "source": carray.SOURCE_FILE,
        "size_bytes": len(data),
        "sha256": digest,
    }


def reseal(directory: Path, manifest: Any) -> None:
    """Write ``manifest`` (any JSON) and SHA256SUMS so that every checksum matches again."""
    names = sorted(p.name for p in directory.iterdir() if p.name not in (MANIFEST_FILE, SUMS_FILE))
    if isinstance(manifest, dict):
        manifest["files"] = {name: sha256_file(directory / name) for name in names}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    (directory / SUMS_FILE).write_text(render_sums(directory, [*names, MANIFEST_FILE]))


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    directory = tmp_path / "bundle"
    directory.mkdir()
    tiny_onnx(directory / MODEL)
    io = {
        "inputs": [{"name": "input", "shape": ["batch", 4], "dtype": "float32"}],
        "outputs": [{"name": "logits", "shape": ["batch", 3], "dtype": "float32"}],
    }
    artifact = {"file": MODEL, "companion_files": [], "backend": "onnxruntime", "precision": "fp32", **io}
    manifest = {
        "edgekd_bundle": 1,
        "artifacts": [artifact],
        "firmware": write_c_array(directory, MODEL),
        **io,
        "eval_set": None,
        "device_build": None,
    }
    reseal(directory, manifest)
    return directory


def manifest_of(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST_FILE).read_text())


def assert_refused(directory: Path, *fragments: str) -> None:
    """verify raises one line naming the fragments; the CLI exits 2 with that one line."""
    with pytest.raises(BundleError) as caught:
        verify_bundle(directory)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_the_clean_bundle_verifies(bundle: Path) -> None:
    rows = dict(verify_bundle(bundle))
    assert rows[MODEL] == "ran 1 input (1, 4) on onnxruntime: output (1, 3)"
    assert rows[carray.SOURCE_FILE].startswith(f"{(bundle / MODEL).stat().st_size} bytes ==")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A valid model outside the bundle, which verify must never load."""
    path = tmp_path / "outside.onnx"
    tiny_onnx(path)
    return path


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("artifacts.0.file", "../outside.onnx"),
        ("artifacts.0.file", "OUTSIDE"),  # the absolute path of the model outside
        ("artifacts.0.file", "sub/../../outside.onnx"),
        ("artifacts.0.file", ".."),
        ("artifacts.0.companion_files", ["../outside.onnx"]),
        ("firmware.artifact", "../outside.onnx"),
        ("firmware.source", "/etc/passwd"),
        ("eval_set", {"file": "../eval.npz"}),
        ("device_build", {"files": ["/etc/hostname"], "unbuilt": []}),
    ],
)
def test_paths_leaving_the_bundle_are_refused(bundle: Path, outside: Path, field: str, value: Any) -> None:
    manifest = manifest_of(bundle)
    value = str(outside) if value == "OUTSIDE" else value
    holder: Any = manifest
    *parents, key = field.split(".")
    for part in parents:
        holder = holder[int(part)] if part.isdigit() else holder[part]
    holder[key] = value
    reseal(bundle, manifest)
    assert_refused(bundle, str(bundle / MANIFEST_FILE), "is not a file of the bundle", "refused")


def test_a_name_not_listed_in_the_checksums_is_refused(bundle: Path) -> None:
    manifest = manifest_of(bundle)
    manifest["artifacts"][0]["file"] = "ghost.onnx"
    reseal(bundle, manifest)
    assert_refused(bundle, "artifacts[0].file 'ghost.onnx' is not one of the files listed in SHA256SUMS")


def test_a_symlinked_artifact_is_refused(bundle: Path, outside: Path) -> None:
    (bundle / MODEL).unlink()
    shutil.copyfile(outside, outside.with_name("copy.onnx"))
    (bundle / MODEL).symlink_to(outside.with_name("copy.onnx"))
    reseal(bundle, manifest_of(bundle))  # the link's target has the right bytes: only the link betrays it
    assert_refused(bundle, f"{bundle / MODEL}: is a symbolic link (to {outside.with_name('copy.onnx')})")
    assert_user_error(run_cli("verify-bundle", str(bundle)), "is a symbolic link")


def test_symlinked_checksums_and_added_links_are_refused(bundle: Path, tmp_path: Path) -> None:
    sums = tmp_path / "sums"
    shutil.move(bundle / SUMS_FILE, sums)
    (bundle / SUMS_FILE).symlink_to(sums)
    assert_refused(bundle, f"{SUMS_FILE}: is a symbolic link")
    (bundle / SUMS_FILE).unlink()
    shutil.move(sums, bundle / SUMS_FILE)
    (bundle / "dangling").symlink_to(tmp_path / "nowhere")
    assert_refused(bundle, "dangling: is a symbolic link")
    (bundle / "dangling").unlink()
    (bundle / "subdir").mkdir()
    assert_refused(bundle, "subdir: is not a regular file")


def _drop(key: str) -> Any:
    def change(manifest: dict[str, Any]) -> Any:
        del manifest[key]
        return manifest

    return change


def _set(path: str, value: Any) -> Any:
    def change(manifest: dict[str, Any]) -> Any:
        holder: Any = manifest
        *parents, key = path.split(".")
        for part in parents:
            holder = holder[int(part)] if part.isdigit() else holder[part]
        if isinstance(holder, list):
            holder[int(key)] = value
        else:
            holder[key] = value
        return manifest

    return change


HUGE = int(MAX_SAMPLE_ELEMENTS**0.5) + 1


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda manifest: [manifest], "expected a JSON object, got a list"),
        (lambda manifest: "bundle", "expected a JSON object, got a string"),
        (_drop("artifacts"), "artifacts is missing"),
        (_drop("inputs"), "inputs is missing"),
        (_set("artifacts", {"file": MODEL}), "artifacts must be a list, got {"),
        (_set("artifacts.0", MODEL), "artifacts[0] must be an object, got 'student.fp32.onnx'"),
        (_set("artifacts.0.file", 7), "artifacts[0].file must be a string, got 7"),
        (
            _set("artifacts.0.precision", "int4"),
            "artifacts[0].precision 'int4' is not one of fp32, fp16, int8",
        ),
        (_set("artifacts.0.inputs", []), "artifacts[0].inputs is empty"),
        (_set("artifacts.0.inputs", None), "artifacts[0].inputs must be a list, got None"),
        (_set("artifacts.0.inputs.0", "input"), "artifacts[0].inputs[0] must be an object"),
        (_set("artifacts.0.inputs.0.shape", [1e9, 1e9]), "each dimension must be a positive int"),
        (_set("artifacts.0.inputs.0.shape", [1, -4]), "each dimension must be a positive int"),
        (_set("artifacts.0.inputs.0.shape", [True, 4]), "each dimension must be a positive int"),
        (_set("artifacts.0.inputs.0.shape", "batch,4"), "artifacts[0].inputs[0].shape must be a list"),
        (_set("artifacts.0.inputs.0.shape", [1] * 40), "has 40 dimensions, more than 32"),
        (_set("artifacts.0.inputs.0.shape", [HUGE, HUGE]), f"more than the {MAX_SAMPLE_ELEMENTS} elements"),
        (_set("artifacts.0.inputs.0.shape", [10**9, 10**9]), f"more than the {MAX_SAMPLE_ELEMENTS} elements"),
        (_set("artifacts.0.inputs.0.dtype", "floaty"), "'floaty' is not a numeric numpy dtype"),
        (_set("artifacts.0.inputs.0.dtype", "object"), "'object' is not a numeric numpy dtype"),
        (_set("artifacts.0.inputs.0.dtype", "S1000000000"), "is not a numeric numpy dtype"),
        (_set("artifacts.0.inputs.0.dtype", ["float32"]), "dtype must be a string"),
        (_set("inputs", "input"), "inputs must be a list, got 'input'"),
        (_set("firmware", ["model_data.c"]), "firmware must be an object, got ['model_data.c']"),
        (_set("firmware.source", None), "firmware.source must be a string, got None"),
        (_set("eval_set", {"frames": 3}), "eval_set.file is missing"),
    ],
)
def test_malformed_manifest_fields_are_one_line_each(bundle: Path, change: Any, expected: str) -> None:
    reseal(bundle, change(manifest_of(bundle)))
    assert_refused(bundle, str(bundle / MANIFEST_FILE), expected)


@pytest.mark.parametrize(
    "manifest",
    [[], "x", {"files": []}, {"files": {"a": 1}}],
    ids=["list", "string", "files-list", "files-int"],
)
def test_manifest_files_of_the_wrong_type(bundle: Path, manifest: Any) -> None:
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    names = sorted(p.name for p in bundle.iterdir() if p.name != SUMS_FILE)
    (bundle / SUMS_FILE).write_text(render_sums(bundle, names))
    assert_refused(bundle, str(bundle / MANIFEST_FILE))


def test_deeply_nested_manifest_is_one_line(bundle: Path) -> None:
    (bundle / MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000)
    names = sorted(p.name for p in bundle.iterdir() if p.name != SUMS_FILE)
    (bundle / SUMS_FILE).write_text(render_sums(bundle, names))
    assert_refused(bundle, str(bundle / MANIFEST_FILE))


def test_cli_exits_2_with_one_line_for_hostile_manifests(bundle: Path, outside: Path) -> None:
    manifest = manifest_of(bundle)
    manifest["artifacts"][0]["file"] = str(outside)
    reseal(bundle, manifest)
    assert_user_error(run_cli("verify-bundle", str(bundle)), "is not a file of the bundle")
    manifest["artifacts"][0]["file"] = MODEL
    manifest["artifacts"][0]["inputs"][0]["shape"] = [10**9, 10**9]
    reseal(bundle, manifest)
    assert_user_error(run_cli("verify-bundle", str(bundle)), "elements verify allocates")
    reseal(bundle, [manifest])
    assert_user_error(run_cli("verify-bundle", str(bundle)), "expected a JSON object, got a list")


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_c_array_is_detected(bundle: Path) -> None:
    source = bundle / carray.SOURCE_FILE
    original = source.read_text()
    _truncate(source, 0.5)  # a copy cut short, checksums not updated
    assert_refused(bundle, f"{source}: SHA-256 differs")
    reseal(bundle, manifest_of(bundle))  # and resealed: the array itself no longer parses
    assert_refused(bundle, f"{source}: no 'model_data' array")
    # cut short consistently (fewer bytes, matching model_data_len): shorter than the artifact
    data = (bundle / MODEL).read_bytes()[:-10]
    source.write_text(carray.render_source(data, MODEL, "0" * 64, "test"))
    reseal(bundle, manifest_of(bundle))
    size = len(data) + 10
    assert_refused(bundle, f"{source}: the array differs from {MODEL} in length ({size - 10} vs {size})")
    source.write_text(original)
    reseal(bundle, manifest_of(bundle))
    verify_bundle(bundle)


def test_truncated_artifact_with_a_matching_c_array_is_one_line(bundle: Path) -> None:
    _truncate(bundle / MODEL, 0.6)
    manifest = manifest_of(bundle)
    manifest["firmware"] = write_c_array(bundle, MODEL)
    reseal(bundle, manifest)
    assert_refused(bundle, f"{bundle / MODEL}: onnxruntime cannot load")
    assert_user_error(run_cli("verify-bundle", str(bundle)), str(bundle / MODEL))


def test_firmware_size_and_digest_must_match(bundle: Path) -> None:
    manifest = manifest_of(bundle)
    manifest["firmware"]["size_bytes"] += 1
    reseal(bundle, manifest)
    assert_refused(bundle, "firmware.size_bytes")
    manifest["firmware"]["size_bytes"] -= 1
    manifest["firmware"]["sha256"] = "0" * 64
    reseal(bundle, manifest)
    assert_refused(bundle, f"firmware.sha256 is not the SHA-256 of {MODEL}")


def test_not_a_bundle(tmp_path: Path) -> None:
    assert_refused(tmp_path / "missing", "is not an edgekd bundle")
    (tmp_path / "file").write_text("x")
    assert_refused(tmp_path / "file", "is not an edgekd bundle")
    assert os.path.isdir(tmp_path)


def test_the_device_runner_refuses_a_manifest_leaving_the_bundle(
    bundle: Path, outside: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The profiler that runs on the device checks the manifest as verify-bundle does."""
    from edgekd.profile import device_runner

    manifest = manifest_of(bundle)
    manifest["artifacts"][0]["file"] = str(outside)
    reseal(bundle, manifest)
    out = tmp_path / "result.json"
    assert device_runner.main([str(bundle), str(out), "--warmup", "0", "--iterations", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "is not a file of the bundle" in error
    assert not out.exists()
