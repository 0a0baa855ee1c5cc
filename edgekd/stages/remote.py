"""Stage 8: profile the bundle on a remote device over SSH, when one is given; else skipped.

The device is ``device.host`` (``--device``) or the target file's ``device:``. Its rows join the
report marked with the device they were measured on (hostname, arch, runtime versions it reports).
A TensorRT bundle's engines are built there first (``build_engine.sh``); each artifact the device
could not build or load is recorded under ``not_measured`` with the device's one-line reason, and
the stage still finishes when nothing could be measured there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd import atomic
from edgekd.pipeline import RunContext, Stage
from edgekd.profile.remote import DeviceAddress, SshOptions, profile_remote
from edgekd.recipe import Recipe
from edgekd.stages.model_import import load_student, student_stage
from edgekd.targets import resolve_target

RESULT_FILE = "device_profile.json"


def device_host(recipe: Recipe) -> str | None:
    return recipe.device.host or resolve_target(recipe.target).device


def _config(recipe: Recipe) -> dict[str, Any]:
    return {
        "host": device_host(recipe),
        "device": recipe.device.model_dump(mode="json"),
        "profile": recipe.profile.model_dump(mode="json"),
    }


def _inputs(ctx: RunContext) -> list[Path]:
    return [ctx.run_dir / name for name in ctx.output("bundle", "bundle_files")]


def _name(item: dict[str, Any], device: dict[str, Any]) -> str:
    return f"student ({item['backend']} {item['precision'].upper()}) on {device['hostname']}"


def device_rows(ctx: RunContext, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The device's measurements as report rows (same fields as the profile stage's), marked with it."""
    device = result["device"]
    bundle = ctx.output("bundle", "bundle_dir")
    stage = student_stage(ctx)
    return [
        {
            "name": _name(row, device),
            "role": "student",
            "model": ctx.output(stage, "model"),
            "runtime": row["backend"],
            "precision": row["precision"],
            "size_bytes": row["size_bytes"],
            "params": ctx.output(stage, "params"),
            "flops": ctx.output(stage, "flops"),
            "artifact": f"{bundle}/{row['file']}",
            "accuracy": row["accuracy"],
            "latency": row["latency"],
            "memory": row.get("memory"),  # absent from runners older than issue 13
            "runtime_info": row["runtime_info"],
            "measured_on": device,
        }
        for row in result["rows"]
    ]


def device_not_measured(ctx: RunContext, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The artifacts the device did not build or could not load, as the report's not-measured items."""
    bundle = ctx.output("bundle", "bundle_dir")
    return [
        {
            "name": _name(item, result["device"]),
            "backend": item["backend"],
            "precision": item["precision"],
            "artifact": f"{bundle}/{item['file']}",
            "profiled": False,
            "why": item["reason"],
        }
        for item in result["skipped"]
    ]


def score_device_detections(
    result: dict[str, Any], bundle: Path, student: Any | None = None
) -> dict[str, Any]:
    """``result`` (the device runner's JSON) with each detection row scored here, on the host.

    The device ships its post-processed detections (``detections``, packed) with every row; a device
    without faster-coco-eval cannot compute COCO mAP (its ``accuracy`` is None), so the host scores
    them against the bundle's ``eval.npz`` ground truth with the same code
    (:func:`edgekd.profile.detection_post.score`). With ``student`` (the PyTorch student) the host also
    computes the agreement mAP: the device's detections against the student's own on the same images
    (:func:`edgekd.detection.metrics.agreement`), as the profile stage does for the host's artifacts.
    """
    import json

    import numpy as np

    from edgekd.detection.evaluate import TorchDetector, predict
    from edgekd.detection.metrics import Detections, agreement
    from edgekd.profile.detection_post import score, unpack

    rows = [row for row in result["rows"] if row.get("detections") is not None]
    eval_file = bundle / "eval.npz"
    if not rows or not eval_file.is_file():
        return result
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    classes = list(manifest["labels"])
    with np.load(eval_file) as loaded:
        arrays = {key: loaded[key] for key in loaded.files}
    size = int(arrays["x"].shape[-1])
    reference = None if student is None else predict(TorchDetector(student), arrays["x"])
    scored = []
    for row in result["rows"]:
        if row.get("detections") is None:
            scored.append(row)
            continue
        found = unpack(row["detections"])
        accuracy = row["accuracy"]
        if accuracy is None:
            here = score(arrays, found, classes)  # None only without faster-coco-eval on the host too
            accuracy = None if here is None else {**here, "scored_on": "host (the device's detections)"}
        if accuracy is not None and reference is not None:
            agreed = agreement(reference, [Detections(*item) for item in found], classes, size)
            finite = [None if value != value else float(value) for value in (agreed.map, agreed.map50)]
            accuracy = {**accuracy, "agreement": finite[0], "agreement_map50": finite[1]}
        scored.append({**row, "accuracy": accuracy})
    return {**result, "rows": scored}


def _run(ctx: RunContext, stage_dir: Path) -> dict[str, Any]:
    host = device_host(ctx.recipe)
    if host is None:
        return {"skipped": "no device (set --device user@host[:port] or device.host)", "rows": []}
    spec, profile = ctx.recipe.device, ctx.recipe.profile
    address = DeviceAddress.parse(host)
    options = SshOptions(
        spec.known_hosts, spec.identity_file, spec.connect_timeout_s, spec.timeout_s, spec.remote_python
    )
    protocol = {
        "warmup": profile.warmup,
        "iterations": profile.iterations,
        "batch": profile.batch_size,
        "threads": profile.threads,
        "hint": profile.openvino_hint,
    }
    ctx.log(f"  profiling on {address} over SSH")
    bundle = ctx.run_dir / ctx.output("bundle", "bundle_dir")
    result = profile_remote(bundle, address, options, protocol)
    if ctx.task == "detection":
        result = score_device_detections(result, bundle, load_student(ctx))
    atomic.write_json(stage_dir / RESULT_FILE, result)
    rows, not_measured = device_rows(ctx, result), device_not_measured(ctx, result)
    metric = "mAP" if ctx.task == "detection" else "accuracy"
    for row in rows:
        value = (row["accuracy"] or {}).get("accuracy")  # None: not scored, or mAP of no object
        accuracy = "–" if value is None else f"{value:.4f}"
        ctx.log(f"  {row['name']}: {metric} {accuracy}, p50 {row['latency']['p50_ms']:.3f} ms")
    for item in not_measured:
        ctx.log(f"  {item['name']}: not measured ({item['why']})")
    if not rows:
        ctx.log(f"  nothing could be measured on {result['device']['hostname']} (reasons above)")
    return {
        "device": result["device"],
        "address": str(address),
        "rows": rows,
        "not_measured": not_measured,
        "engine_build": result["engine_build"],
        "result_file": str((stage_dir / RESULT_FILE).relative_to(ctx.run_dir)),
    }


STAGE = Stage("remote", _run, _config, _inputs)
