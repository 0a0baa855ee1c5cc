"""Check a bundle: every checksum, the C array against its artifact, and each artifact loads and runs.

A modified, missing or unexpected file is a :class:`BundleError` naming the file. An artifact whose
runtime is not installed here (or that only loads on its device, like a TensorRT engine) is reported
as "cannot load here: why", which is not a failure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.backends import BACKENDS, Artifact
from edgekd.bundle import carray
from edgekd.bundle.checksums import MANIFEST_FILE, SUMS_FILE, modified_files, read_sums
from edgekd.errors import BundleError, EdgekdError
from edgekd.hashing import sha256_file

# Which runtime loads an artifact file, by its suffix.
LOADERS = {".onnx": "onnxruntime", ".xml": "openvino", ".engine": "tensorrt", ".plan": "tensorrt"}


def _check_checksums(directory: Path) -> dict[str, Any]:
    """Raise naming the file that differs from SHA256SUMS / manifest.json; return the manifest."""
    sums = read_sums(directory)
    present = {p.name for p in directory.iterdir() if p.is_file()}
    unexpected = sorted(present - set(sums) - {SUMS_FILE})
    if unexpected:
        raise BundleError(f"{directory / unexpected[0]}: not listed in {SUMS_FILE} (a file was added)")
    if MANIFEST_FILE not in sums:
        raise BundleError(
            f"{directory / SUMS_FILE}: has no entry for {MANIFEST_FILE} (the file was modified)"
        )
    changed = modified_files(directory, sums)
    if MANIFEST_FILE in changed:
        raise BundleError(
            f"{directory / MANIFEST_FILE}: SHA-256 differs from its {SUMS_FILE} entry "
            f"(one of the two was modified)"
        )
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{directory / MANIFEST_FILE}: not valid JSON ({exc.msg})") from None
    listed = manifest.get("files", {})
    if changed:
        name = changed[0]
        if listed.get(name) == sha256_file(directory / name):
            raise BundleError(f"{directory / SUMS_FILE}: its entry for {name} was modified")
        raise BundleError(
            f"{directory / name}: SHA-256 differs from manifest.json and {SUMS_FILE} (the file was modified)"
        )
    expected = {name: digest for name, digest in sums.items() if name != MANIFEST_FILE}
    if listed != expected:
        differing = sorted(set(listed.items()) ^ set(expected.items()))[0][0]
        raise BundleError(
            f"{directory / MANIFEST_FILE}: its checksum of {differing} disagrees with {SUMS_FILE}"
        )
    return manifest


def _check_c_array(directory: Path, manifest: dict[str, Any]) -> str:
    firmware = manifest["firmware"]
    source = directory / firmware["source"]
    array = carray.parse_source(source.read_text(encoding="utf-8", errors="replace"), str(source))
    artifact = (directory / firmware["artifact"]).read_bytes()
    if array != artifact:
        offset = next((i for i, (a, b) in enumerate(zip(array, artifact, strict=False)) if a != b), None)
        where = f"at byte {offset}" if offset is not None else f"in length ({len(array)} vs {len(artifact)})"
        raise BundleError(f"{source}: the array differs from {firmware['artifact']} {where}")
    return f"{len(array)} bytes == {firmware['artifact']}"


def _sample(spec: dict[str, Any]) -> np.ndarray:
    """One input of the manifest's shape (symbolic dimensions, e.g. the batch, set to 1)."""
    shape = [dim if isinstance(dim, int) and dim > 0 else 1 for dim in spec["shape"]]
    return np.random.default_rng(0).standard_normal(shape).astype(spec["dtype"])


def run_artifact(directory: Path, record: dict[str, Any]) -> str:
    """Load one artifact with its runtime and run one input; the outcome as text."""
    path = directory / record["file"]
    name = LOADERS.get(path.suffix)
    if name is None or name not in BACKENDS:
        return f"cannot load here: no runtime in edgekd loads {path.suffix or 'suffix-less'} files"
    backend = BACKENDS.get(name)()
    ok, why = backend.available()
    if not ok:
        return f"cannot load here: {why}"
    sample = _sample(record["inputs"][0])
    try:
        runner = backend.load(Artifact(path, name, record["precision"]), threads=1)
        output = np.asarray(runner.run(sample))
    except EdgekdError as exc:
        raise BundleError(f"{path}: {exc}") from None
    if not np.all(np.isfinite(output)):
        raise BundleError(f"{path}: {name} ran it but the output holds NaN or infinity")
    return f"ran 1 input {tuple(sample.shape)} on {name}: output {tuple(output.shape)}"


def verify_bundle(directory: Path) -> list[tuple[str, str]]:
    """``(check, outcome)`` rows for a clean bundle; BundleError naming the file for a bad one."""
    directory = Path(directory)
    if not (directory / MANIFEST_FILE).is_file():
        raise BundleError(f"{directory} is not an edgekd bundle: {MANIFEST_FILE} is missing")
    manifest = _check_checksums(directory)
    rows = [("checksums", f"{len(manifest['files']) + 1} files match {SUMS_FILE} and manifest.json")]
    if manifest.get("firmware"):
        rows.append((carray.SOURCE_FILE, _check_c_array(directory, manifest)))
    rows += [(record["file"], run_artifact(directory, record)) for record in manifest["artifacts"]]
    return rows
