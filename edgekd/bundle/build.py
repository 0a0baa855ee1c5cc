"""Write ``<run>/bundle/<target>/`` from a run's finished stages (host side).

The bundle holds the compile stage's artifact files, ``model_data.h`` / ``model_data.c`` (the deployed
artifact as a C array: the deployment decision of :mod:`edgekd.deployment`, made from the profile
stage's measurements, which ``manifest.json`` records under ``deployment``), ``eval.npz`` (held-out
frames for on-device accuracy, optional),
``manifest.json`` (interface, preprocessing, labels, quantisation, versions, per-file SHA-256) and
``SHA256SUMS`` (every file, the manifest included). It is built in a temporary directory beside the
final one and renamed into place, so a crash never leaves a half-written bundle; a rebuild whose
content equals the bundle in place keeps that one (its ``created`` included), so a rerun is quiet.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import shutil
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import __version__, atomic
from edgekd.bundle import carray
from edgekd.bundle.checksums import MANIFEST_FILE, SUMS_FILE, render_sums
from edgekd.deployment import decide
from edgekd.errors import BundleError, OutputError
from edgekd.hashing import sha256_file
from edgekd.pipeline import RunContext

BUNDLE_DIR = "bundle"
EVAL_FILE = "eval.npz"
RUNTIMES = ("numpy", "onnxruntime", "openvino", "tensorrt")


def bundle_dir(run_dir: Path, target: str) -> Path:
    return run_dir / BUNDLE_DIR / target


def runtime_versions() -> dict[str, str | None]:
    """Installed versions of the runtimes a bundle may be loaded with (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in RUNTIMES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _onnx_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}

    def tensor(value: Any) -> dict[str, Any]:
        info = value.type.tensor_type
        shape = [
            dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?") for dim in info.shape.dim
        ]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(info.elem_type)).name
        return {"name": value.name, "shape": shape, "dtype": dtype}

    return {
        "inputs": [tensor(v) for v in graph.input if v.name not in initializers],
        "outputs": [tensor(v) for v in graph.output],
    }


def _ir_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    import openvino as ov

    model = ov.Core().read_model(str(path))

    def port(item: Any) -> dict[str, Any]:
        shape = [dim.get_length() if dim.is_static else "?" for dim in item.get_partial_shape()]
        return {
            "name": item.get_any_name(),
            "shape": shape,
            "dtype": np.dtype(item.get_element_type().to_dtype()).name,
        }

    return {"inputs": [port(p) for p in model.inputs], "outputs": [port(p) for p in model.outputs]}


def describe_io(path: Path, fallback_onnx: Path) -> dict[str, Any]:
    """Inputs/outputs (name, shape with symbolic dims as text, dtype) read from the artifact itself.

    Formats read here: ONNX, and OpenVINO IR when openvino is installed; others (TensorRT engines)
    take the interface of the ONNX they were built from, and say so in ``io_source``.
    """
    if path.suffix == ".onnx":
        return {**_onnx_io(path), "io_source": path.name}
    if path.suffix == ".xml":
        try:
            return {**_ir_io(path), "io_source": path.name}
        except ImportError:
            pass
    return {**_onnx_io(fallback_onnx), "io_source": f"{fallback_onnx.name} (the ONNX it was built from)"}


def quantization_summary(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """Scheme, symmetry, granularity and calibration provenance of an INT8 artifact, plus the full record."""
    if not record:
        return None
    return {
        "scheme": record.get("format") or record.get("tool"),
        "weight_type": record.get("weight_type"),
        "activation_type": record.get("activation_type"),
        "symmetric_activations": record.get("symmetric_activations"),
        "per_channel": record.get("per_channel"),
        "method": record.get("method") or record.get("preset"),
        "calibration": record.get("calibration"),
        "record": record,
    }


def _artifact_quantization(ctx: RunContext, record: dict[str, Any]) -> dict[str, Any] | None:
    if record["precision"] != "int8":
        return None
    own = record["metadata"].get("quantization")  # backends that quantise themselves (NNCF)
    return quantization_summary(own or ctx.results["quantize"].outputs.get("quantization"))


def deployment_decision(ctx: RunContext, precision: str | None = None) -> dict[str, Any]:
    """The run's deployment decision (:func:`edgekd.deployment.decide`) from its profile and compile
    records; ``precision`` (``edgekd bundle --artifact``), else ``bundle.artifact``, pins it."""
    compiled = ctx.results["compile"].outputs
    return decide(
        ctx.output("profile", "rows"),
        compiled["artifacts"],
        compiled.get("unbuilt_artifacts", []),
        max_drop=ctx.recipe.quantize.max_accuracy_drop,
        pinned=precision or ctx.recipe.bundle.artifact,
        target=ctx.target.name,
        **({"metric": "mAP"} if ctx.task == "detection" else {}),
    )


def _choose(artifacts: list[dict[str, Any]], decision: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest entry of the decided artifact, for model_data.c; None when the decision is an
    engine left to the device (nothing built here to embed)."""
    if decision["artifact"] is None:
        return None
    return next(entry for entry in artifacts if entry["file"] == decision["file"])


def _memory_of(ctx: RunContext, path: str) -> dict[str, Any] | None:
    """The profile stage's peak-memory record of the artifact at run-relative ``path`` (None: unmeasured)."""
    row = next((row for row in ctx.output("profile", "rows") if row.get("artifact") == path), None)
    return None if row is None else row.get("memory")


def _eval_arrays(ctx: RunContext) -> dict[str, np.ndarray] | None:
    """The first ``bundle.eval_samples`` held-out frames (the profile stage's frames), labels, SNRs."""
    limit = ctx.recipe.bundle.eval_samples
    if limit == 0:
        return None
    _, val_set, _ = ctx.dataset
    if ctx.task == "detection":
        return detection_eval_arrays(val_set, limit)
    arrays = {"x": np.ascontiguousarray(val_set.x[:limit], dtype=np.float32), "y": val_set.y[:limit]}
    if val_set.snr is not None:
        arrays["groups"] = val_set.snr[:limit]
    return arrays


def detection_eval_arrays(val_set: Any, limit: int | None) -> dict[str, np.ndarray]:
    """A detection eval set: images ``x`` and the ground truth flattened (``gt_counts`` per image, then
    ``gt_boxes`` cxcywh in [0, 1] and ``gt_labels``), with each image's ``letterbox`` record."""
    count = len(val_set) if limit is None else min(limit, len(val_set))
    boxes, labels = val_set.boxes[:count], val_set.labels[:count]
    return {
        "x": np.ascontiguousarray(val_set.images[:count], dtype=np.float32),
        "gt_counts": np.array([len(b) for b in labels], dtype=np.int64),
        "gt_boxes": np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]),
        "gt_labels": np.concatenate([np.asarray(b, np.int64).reshape(-1) for b in labels]),
        "letterbox": np.asarray(val_set.letterbox[:count], dtype=np.float32),
    }


def _eval_set_record(ctx: RunContext, eval_arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    if ctx.task == "detection":
        return {
            "file": EVAL_FILE,
            "frames": len(eval_arrays["x"]),
            "split": "held-out (the first images of the split the profile stage evaluates)",
            "arrays": {
                "x": "model inputs (letterboxed, normalised)",
                "gt_counts": "objects per image",
                "gt_boxes": "ground-truth boxes, cxcywh in [0, 1] of the input, image after image",
                "gt_labels": "ground-truth class indices, same order",
                "letterbox": "per image: scale_x, scale_y, pad_x, pad_y, original width, height",
            },
        }
    return {
        "file": EVAL_FILE,
        "frames": len(eval_arrays["y"]),
        "split": "held-out (the first frames of the split the profile stage evaluates)",
        "arrays": {"x": "model inputs (preprocessed)", "y": _label_source(ctx), "groups": "SNR in dB"},
    }


def _copy_artifacts(ctx: RunContext, work: Path) -> list[str]:
    """Copy the artifacts and the device-build inputs (``bundle_files``, e.g. for TensorRT); those names."""
    outputs = ctx.results["compile"].outputs
    seen: dict[str, str] = {}
    for name in dict.fromkeys([*outputs["artifact_files"], *outputs.get("bundle_files", [])]):
        base = Path(name).name
        if base in seen:
            raise BundleError(f"artifacts {seen[base]} and {name} share the file name {base}; rename one")
        seen[base] = name
        shutil.copyfile(ctx.run_dir / name, work / base)
    return [Path(name).name for name in outputs.get("bundle_files", [])]


def _unbuilt(ctx: RunContext, work: Path) -> list[dict[str, Any]]:
    """The engines to build on the device, each with the interface of the bundled ONNX it is built from."""
    return [
        {**item, **describe_io(work / Path(item["engine"]).name, work / Path(item["onnx"]).name)}
        for item in ctx.results["compile"].outputs.get("unbuilt_artifacts", [])
    ]


def _fill(ctx: RunContext, work: Path, decision: dict[str, Any]) -> dict[str, Any]:
    """Write every bundle file into ``work``; return the manifest (without ``files``)."""
    target = ctx.target
    device_build = _copy_artifacts(ctx, work)
    export_onnx = ctx.path("export", "onnx_file")
    artifacts = []
    for record in ctx.output("compile", "artifacts"):
        file = Path(record["path"]).name
        companions = [Path(f).name for f in record["metadata"].get("companion_files", [])]
        artifacts.append(
            {
                "file": file,
                "companion_files": companions,
                "backend": record["backend"],
                "precision": record["precision"],
                "size_bytes": sum((work / f).stat().st_size for f in [file, *companions]),
                **describe_io(work / file, export_onnx),
                "quantization": _artifact_quantization(ctx, record),
                "memory": _memory_of(ctx, record["path"]),
            }
        )
    chosen = _choose(artifacts, decision)
    if chosen is not None and chosen["file"].endswith(".tflite"):  # a microcontroller: TFLM sources
        from edgekd.mcu.firmware import bundle_firmware

        firmware = bundle_firmware(ctx, work, chosen)
    else:
        firmware = None if chosen is None else _write_c_array(work, chosen)
    _, _, meta = ctx.dataset
    eval_arrays = _eval_arrays(ctx)
    if eval_arrays is not None:  # bytes that depend only on the arrays (np.savez stamps the time)
        from edgekd.objects import npz_bytes

        (work / EVAL_FILE).write_bytes(npz_bytes(eval_arrays))
    return {
        "edgekd_bundle": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "tool": {"name": "edgekd", "version": __version__},
        "runtimes": runtime_versions(),
        "run": ctx.recipe.name,
        "target": target.to_dict(),
        "model": ctx.recipe.student.model if "model" in ctx.results else ctx.output("distill", "model"),
        "task": meta.task,
        "input_shape": list(meta.input_shape),
        "labels": list(meta.classes),
        "preprocessing": meta.normalisation,
        "training": _training(ctx),
        "dataset": {"name": meta.name, "fingerprint": meta.fingerprint, "source": meta.source},
        "artifacts": artifacts,
        "deployment": _manifest_decision(decision),
        "firmware": firmware,
        "inputs": (chosen or {}).get("inputs"),
        "outputs": (chosen or {}).get("outputs"),
        "quantization": (chosen or {}).get("quantization"),
        "device_build": {"files": device_build, "unbuilt": _unbuilt(ctx, work)} if device_build else None,
        "eval_set": None if eval_arrays is None else _eval_set_record(ctx, eval_arrays),
        **({"postprocessing": postprocessing_record()} if ctx.task == "detection" else {}),
    }


def postprocessing_record() -> dict[str, Any]:
    """A detector's post-processing as the manifest records it and the device runner applies it."""
    from edgekd.profile.detection_post import spec

    return spec()


def _manifest_decision(decision: dict[str, Any]) -> dict[str, Any]:
    """The decision as the manifest states it: files by their bundle names, measured on this host."""
    return {
        **{key: value for key, value in decision.items() if key != "artifact"},
        "embedded": decision["artifact"] is not None,  # False: an engine left to the device
        "measured_on": f"{platform.node()} (the host the profile stage ran on)",
    }


def _label_source(ctx: RunContext) -> str:
    """What eval.npz's ``y`` holds: the labels, or (deploy, unlabelled data) the FP32 model's predictions."""
    if "model" in ctx.results and "labels_file" in ctx.results["model"].outputs:
        return "the FP32 model's predictions (the data has no labels)"
    return "labels"


def _training(ctx: RunContext) -> dict[str, Any]:
    """How the model was obtained: distilled here (method, augmentation), or trained elsewhere (deploy)."""
    if "model" in ctx.results:
        origin = ctx.output("model", "origin")
        return {
            "method": None,
            "augmentation": None,
            "trained": "elsewhere (edgekd deploy)",
            "origin": origin,
        }
    outputs = ctx.results["distill"].outputs
    return {"method": outputs["method"], "augmentation": outputs.get("augment")}  # detection: no augment


def _write_c_array(work: Path, chosen: dict[str, Any]) -> dict[str, Any]:
    """``model_data.h`` / ``model_data.c`` of the chosen artifact; its ``firmware`` manifest entry."""
    data = (work / chosen["file"]).read_bytes()
    digest = sha256_file(work / chosen["file"])
    tool = f"edgekd {__version__}"
    (work / carray.HEADER_FILE).write_text(carray.render_header(chosen["file"], digest, len(data), tool))
    (work / carray.SOURCE_FILE).write_text(carray.render_source(data, chosen["file"], digest, tool))
    return {
        "artifact": chosen["file"],
        "precision": chosen["precision"],
        "header": carray.HEADER_FILE,
        "source": carray.SOURCE_FILE,
        "symbol": carray.SYMBOL,
        "length_symbol": f"{carray.SYMBOL}_len",
        "alignment": carray.ALIGNMENT,
        "size_bytes": len(data),
        "sha256": digest,
    }


def write_bundle(ctx: RunContext, precision: str | None = None) -> Path:
    """Build the bundle of ``ctx``'s run and target, replacing any previous one; returns its directory.

    The embedded artifact is the deployment decision's (``precision`` pins it, as ``bundle.artifact``).
    """
    return write_decided_bundle(ctx, deployment_decision(ctx, precision))


def write_decided_bundle(ctx: RunContext, decision: dict[str, Any]) -> Path:
    """:func:`write_bundle` for a decision already made (the bundle stage records the same one).

    The bundle is built in ``.<target>.<pid>.<random>/`` beside the final directory (named after this
    process, like :mod:`edgekd.atomic`'s temporary files, so runs on one run directory never share one,
    and those a killed process left are removed), then renamed into place. When its content equals
    the bundle already there (every file, and the manifest but for ``created``), the existing bundle
    is kept as it is: a rerun changes nothing, ``created`` included.
    """
    final = bundle_dir(ctx.run_dir, ctx.target.name)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_work(final)
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", dir=final.parent))
    except OSError as exc:
        raise atomic.disk_error(final.parent, exc, "create") from None
    try:
        manifest = _fill(ctx, work, decision)
        files = sorted(p.name for p in work.iterdir())
        manifest["files"] = {name: sha256_file(work / name) for name in files}
        atomic.write_json(work / MANIFEST_FILE, manifest)
        if _unchanged(final, work):
            return final
        (work / SUMS_FILE).write_text(render_sums(work, [*files, MANIFEST_FILE]))
        os.chmod(work, 0o755)
        _replace_dir(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _unchanged(final: Path, work: Path) -> bool:
    """Whether the bundle at ``final`` holds the files of the one built in ``work`` (by SHA-256) and
    the same manifest apart from ``created``, with intact checksums."""
    import json

    def manifest(directory: Path) -> dict[str, Any]:
        loaded = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
        return {key: value for key, value in loaded.items() if key != "created"}

    try:
        new = manifest(work)
        if {p.name for p in final.iterdir()} != {*new["files"], MANIFEST_FILE, SUMS_FILE}:
            return False
        if manifest(final) != new:
            return False
        if any(sha256_file(final / name) != digest for name, digest in new["files"].items()):
            return False
        sums = render_sums(final, [*new["files"], MANIFEST_FILE])
        return (final / SUMS_FILE).read_text(encoding="utf-8") == sums
    except (OSError, ValueError, AttributeError):  # no bundle yet, or a damaged one: write it afresh
        return False


def _replace_dir(work: Path, final: Path) -> None:
    """Rename ``work`` to ``final``, moving an existing ``final`` aside first (to a per-process name)."""
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    shutil.rmtree(old, ignore_errors=True)
    for _ in range(3):  # another process may put its bundle in place between the two renames
        try:
            if final.exists():
                os.replace(final, old)
            os.replace(work, final)
            break
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise atomic.disk_error(final, exc) from None
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        raise OutputError(
            f"cannot put the bundle in place at {final}: other processes keep writing it; "
            "run one edgekd bundle / compress per run directory at a time, then rerun"
        )


def _remove_stale_work(final: Path) -> None:
    """Remove the temporary bundle directories (``.<target>.<pid>.*``) whose process is gone."""
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(\d+)\.")
    for entry in final.parent.glob(f".{final.name}.*"):
        match = pattern.match(entry.name)
        if match and entry.is_dir() and int(match[1]) != os.getpid() and not atomic._pid_alive(int(match[1])):
            shutil.rmtree(entry, ignore_errors=True)


def bundle_files(directory: Path, run_dir: Path) -> list[str]:
    """The bundle's files relative to ``run_dir`` (a stage's ``*_files`` output)."""
    return sorted(str(p.relative_to(run_dir)) for p in directory.iterdir() if p.is_file())
