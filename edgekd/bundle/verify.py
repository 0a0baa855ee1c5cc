"""Check a bundle: every checksum, the C array against its artifact and against the artifact the
manifest's deployment decision chose, and each artifact loads and runs.

A modified, missing or unexpected file is a :class:`BundleError` naming the file. An artifact whose
runtime is not installed here (or that only loads on its device, like a TensorRT engine) is reported
as "cannot load here: why", which is not a failure.

A bundle is not trusted: it may come from anywhere, and its manifest and SHA256SUMS can be rewritten
together. So symbolic links (and directories) in it are refused, every file the manifest names must
be one of the bundle's own checksummed files (no absolute paths, no ``..``), the manifest's fields
are checked for type and range before use (one BundleError each), and the input verify allocates to
run an artifact is capped at :data:`MAX_SAMPLE_ELEMENTS`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.backends import BACKENDS, Artifact
from edgekd.backends.base import PRECISIONS
from edgekd.bundle import carray
from edgekd.bundle.checksums import MANIFEST_FILE, SUMS_FILE, modified_files, read_sums
from edgekd.errors import BundleError, first_line
from edgekd.hashing import sha256_file

# Which runtime loads an artifact file, by its suffix.
LOADERS = {
    ".onnx": "onnxruntime",
    ".xml": "openvino",
    ".engine": "tensorrt",
    ".plan": "tensorrt",
    ".tflite": "litert",
}
# Largest input verify allocates to run an artifact (64 MiB of float32); symbolic dimensions count 1.
MAX_SAMPLE_ELEMENTS = 1 << 24
# Numeric dtype kinds a model input may have (bool, signed, unsigned, float).
_INPUT_KINDS = frozenset("biuf")


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_KIND_NAMES = {dict: "object", list: "list", str: "string", bool: "boolean", int: "int", type(None): "null"}
MAX_RANK = 32  # dimensions an input may have (numpy allows 64)


def _type_name(value: Any) -> str:
    return _KIND_NAMES.get(type(value), type(value).__name__)


class _Manifest:
    """Typed access to a parsed manifest; every malformed field is one BundleError naming it."""

    def __init__(self, directory: Path, data: Any, members: set[str]) -> None:
        self.directory = directory
        self.path = directory / MANIFEST_FILE
        self.members = members
        if not isinstance(data, dict):
            raise BundleError(f"{self.path}: expected a JSON object, got a {_type_name(data)}")
        self.data = data

    def fail(self, field: str, problem: str) -> BundleError:
        return BundleError(f"{self.path}: {field} {problem} (the manifest is malformed or was modified)")

    def get(
        self, holder: dict[str, Any], key: str, field: str, kinds: tuple[type, ...], required: bool
    ) -> Any:
        if key not in holder:
            if required:
                raise self.fail(field, "is missing")
            return None
        value = holder[key]
        if value is None and not required:
            return None
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wanted = " or ".join(_KIND_NAMES.get(kind, kind.__name__) for kind in kinds)
            article = "an" if wanted[0] in "aeiou" else "a"
            raise self.fail(field, f"must be {article} {wanted}, got {_shown(value)}")
        return value

    def member(self, value: Any, field: str, listed: bool = True) -> str:
        """``value`` as the name of a file of the bundle: a plain name resolving inside it and, when
        ``listed``, one of the files SHA256SUMS covers."""
        if not isinstance(value, str) or not value or "\x00" in value:
            raise self.fail(field, f"must be a file name, got {_shown(value)}")
        plain = value == Path(value).name and value not in (".", "..") and "\\" not in value
        if not plain or (self.directory / value).resolve().parent != self.directory.resolve():
            raise self.fail(
                field,
                f"{_shown(value)} is not a file of the bundle: absolute paths and paths leading out of "
                f"it are refused",
            )
        if listed and value not in self.members:
            raise self.fail(field, f"{_shown(value)} is not one of the files listed in {SUMS_FILE}")
        return value

    def io_list(self, holder: dict[str, Any], key: str, field: str, required: bool) -> list[dict[str, Any]]:
        """A list of ``{name, shape, dtype}`` tensors, each shape and dtype checked."""
        items = self.get(holder, key, field, (list,), required)
        if items is None:
            return []
        if required and not items:
            raise self.fail(field, "is empty: an artifact has at least one input")
        for index, spec in enumerate(items):
            where = f"{field}[{index}]"
            if not isinstance(spec, dict):
                raise self.fail(where, f"must be an object, got {_shown(spec)}")
            shape = self.get(spec, "shape", f"{where}.shape", (list,), True)
            if len(shape) > MAX_RANK:
                raise self.fail(f"{where}.shape", f"has {len(shape)} dimensions, more than {MAX_RANK}")
            for dim in shape:
                symbolic = isinstance(dim, str)
                if not symbolic and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
                    raise self.fail(
                        f"{where}.shape",
                        f"{_shown(shape)}: each dimension must be a positive int or a symbolic name",
                    )
            dtype = self.get(spec, "dtype", f"{where}.dtype", (str,), True)
            try:
                kind = np.dtype(dtype).kind
            except (TypeError, ValueError):
                kind = None
            if kind not in _INPUT_KINDS:
                raise self.fail(
                    f"{where}.dtype", f"{_shown(dtype)} is not a numeric numpy dtype (e.g. float32)"
                )
        return items


def read_manifest(directory: Path) -> dict[str, Any]:
    """The bundle's manifest.json as an object; BundleError when it is not readable JSON or no object."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{directory / MANIFEST_FILE}: not valid JSON ({exc.msg})") from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{directory / MANIFEST_FILE}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(manifest, dict):
        raise BundleError(
            f"{directory / MANIFEST_FILE}: expected a JSON object, got a {_type_name(manifest)}"
        )
    return manifest


def _check_checksums(directory: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Raise naming the file that differs from SHA256SUMS / manifest.json; return the manifest and sums."""
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
    manifest = read_manifest(directory)
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        raise BundleError(
            f"{directory / MANIFEST_FILE}: files must be an object of file name to SHA-256, got "
            f"{_shown(listed)} (the manifest is malformed or was modified)"
        )
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
    return manifest, sums


def check_manifest(directory: Path, manifest: Any, members: set[str]) -> dict[str, Any]:
    """``manifest`` after checking every field verify (or the device) uses: types, inputs, and that
    each file it names is one of ``members`` (the checksummed files of ``directory``)."""
    m = _Manifest(directory, manifest, members)
    data = m.data
    artifacts = m.get(data, "artifacts", "artifacts", (list,), True)
    for index, record in enumerate(artifacts):
        where = f"artifacts[{index}]"
        if not isinstance(record, dict):
            raise m.fail(where, f"must be an object, got {_shown(record)}")
        m.member(m.get(record, "file", f"{where}.file", (str,), True), f"{where}.file")
        companions = m.get(record, "companion_files", f"{where}.companion_files", (list,), False) or []
        for position, name in enumerate(companions):
            m.member(name, f"{where}.companion_files[{position}]")
        precision = m.get(record, "precision", f"{where}.precision", (str,), True)
        if precision not in PRECISIONS:
            raise m.fail(f"{where}.precision", f"{_shown(precision)} is not one of {', '.join(PRECISIONS)}")
        m.io_list(record, "inputs", f"{where}.inputs", required=True)
    if "inputs" not in data:
        raise m.fail("inputs", "is missing")
    m.io_list(data, "inputs", "inputs", required=False)
    firmware = m.get(data, "firmware", "firmware", (dict,), False)
    if firmware is not None:
        for key in ("source", "artifact"):
            m.member(m.get(firmware, key, f"firmware.{key}", (str,), True), f"firmware.{key}")
        header = m.get(firmware, "header", "firmware.header", (str,), False)
        if header is not None:
            m.member(header, "firmware.header")
        m.get(firmware, "size_bytes", "firmware.size_bytes", (int,), False)
        m.get(firmware, "sha256", "firmware.sha256", (str,), False)
    deployment = m.get(data, "deployment", "deployment", (dict,), False)
    if deployment is not None and m.get(deployment, "embedded", "deployment.embedded", (bool,), False):
        m.member(m.get(deployment, "file", "deployment.file", (str,), True), "deployment.file")
    eval_set = m.get(data, "eval_set", "eval_set", (dict,), False)
    if eval_set is not None:
        m.member(m.get(eval_set, "file", "eval_set.file", (str,), True), "eval_set.file")
    device_build = m.get(data, "device_build", "device_build", (dict,), False)
    if device_build is not None:
        for position, name in enumerate(m.get(device_build, "files", "device_build.files", (list,), True)):
            m.member(name, f"device_build.files[{position}]")
    return data


def _check_deployment(directory: Path, manifest: dict[str, Any], array: bytes | None) -> None:
    """The artifact the manifest's deployment decision chose is the one the C array embeds (by SHA-256)."""
    deployment = manifest.get("deployment")
    if not deployment or not deployment.get("embedded"):
        return
    chosen = deployment["file"]
    if array is None:
        raise BundleError(
            f"{directory / MANIFEST_FILE}: deployment chose {chosen} but the bundle embeds no C array "
            f"(the bundle was modified)"
        )
    embedded = manifest["firmware"]["artifact"]
    if hashlib.sha256(array).hexdigest() != sha256_file(directory / chosen):
        raise BundleError(
            f"{directory / manifest['firmware']['source']}: its array is not {chosen}, the artifact "
            f"manifest.json's deployment chose (it embeds {embedded}); rebuild the bundle with edgekd bundle"
        )


def _check_c_array(directory: Path, manifest: dict[str, Any]) -> str:
    """The C array of ``model_data.c`` equals its artifact byte for byte (length, SHA-256 as recorded),
    and that artifact is the deployment decision's."""
    firmware = manifest["firmware"]
    source = directory / firmware["source"]
    array = carray.parse_source(source.read_text(encoding="utf-8", errors="replace"), str(source))
    artifact = (directory / firmware["artifact"]).read_bytes()
    if array != artifact:
        offset = next((i for i, (a, b) in enumerate(zip(array, artifact, strict=False)) if a != b), None)
        where = f"at byte {offset}" if offset is not None else f"in length ({len(array)} vs {len(artifact)})"
        raise BundleError(f"{source}: the array differs from {firmware['artifact']} {where}")
    recorded = firmware.get("size_bytes")
    if recorded is not None and recorded != len(array):
        raise BundleError(
            f"{directory / MANIFEST_FILE}: firmware.size_bytes {recorded} but {firmware['artifact']} and "
            f"its C array hold {len(array)} bytes (the bundle was modified)"
        )
    digest = firmware.get("sha256")
    if digest is not None and digest != sha256_file(directory / firmware["artifact"]):
        raise BundleError(
            f"{directory / MANIFEST_FILE}: firmware.sha256 is not the SHA-256 of {firmware['artifact']} "
            f"(the bundle was modified)"
        )
    _check_deployment(directory, manifest, array)
    deployed = ", the deployed artifact" if (manifest.get("deployment") or {}).get("embedded") else ""
    return f"{len(array)} bytes == {firmware['artifact']}{deployed}"


def _sample(spec: dict[str, Any], where: str = "inputs[0]") -> np.ndarray:
    """One input of the manifest's shape (symbolic dimensions, e.g. the batch, set to 1), at most
    MAX_SAMPLE_ELEMENTS elements."""
    shape = [dim if isinstance(dim, int) else 1 for dim in spec["shape"]]
    elements = math.prod(shape)
    if elements > MAX_SAMPLE_ELEMENTS:
        raise BundleError(
            f"{where}.shape {_shown(spec['shape'])} asks for more than the {MAX_SAMPLE_ELEMENTS} "
            f"elements verify allocates for a test input (the manifest is malformed or was modified)"
        )
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
    sample = _sample(record["inputs"][0], f"{directory / MANIFEST_FILE}: {record['file']} inputs[0]")
    try:
        runner = backend.load(Artifact(path, name, record["precision"]), threads=1)
        output = np.asarray(runner.run(sample))
    except Exception as exc:  # a runtime's own exception types for a file it cannot load or run
        raise BundleError(f"{path}: {first_line(exc, type(exc).__name__)}") from None
    if not np.issubdtype(output.dtype, np.number) or not np.all(np.isfinite(output)):
        raise BundleError(f"{path}: {name} ran it but the output holds NaN or infinity")
    return f"ran 1 input {tuple(sample.shape)} on {name}: output {tuple(output.shape)}"


def verify_bundle(directory: Path) -> list[tuple[str, str]]:
    """``(check, outcome)`` rows for a clean bundle; BundleError naming the file for a bad one."""
    directory = Path(directory)
    if not directory.is_dir() or not (directory / MANIFEST_FILE).is_file():
        raise BundleError(f"{directory} is not an edgekd bundle: {MANIFEST_FILE} is missing")
    raw, sums = _check_checksums(directory)
    manifest = check_manifest(directory, raw, set(sums))
    rows = [("checksums", f"{len(manifest['files']) + 1} files match {SUMS_FILE} and manifest.json")]
    if manifest.get("firmware"):
        rows.append((manifest["firmware"]["source"], _check_c_array(directory, manifest)))
    else:
        _check_deployment(directory, manifest, None)
    rows += [(record["file"], run_artifact(directory, record)) for record in manifest["artifacts"]]
    return rows
