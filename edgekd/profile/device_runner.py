"""Profile a bundle on the machine this runs on: ``python -m edgekd.profile.device_runner BUNDLE OUT.json``.

Device-side entry point: imports only the standard library, numpy, the artifact's runtime and the
numpy-only parts of edgekd (backends, profile.latency, profile.accuracy, bundle.checksums), so a
device needs no torch, onnx or pydantic; :mod:`edgekd.profile.remote` ships exactly those files.
It checks the bundle's checksums, builds the engines a TensorRT bundle leaves to the device (runs its
``build_engine.sh``, :mod:`edgekd.profile.engine_build`), then for every artifact whose runtime is
installed measures latency with the project's protocol (warm-up, timed iterations, p50/p90/p99,
threads) and accuracy on the bundle's ``eval.npz``, and writes JSON describing the device it ran on.
Artifacts not built or not loadable here are listed under ``skipped`` with the reason.

Exit codes: 0 measured, or engines built here (or not, each with why); 2 a bad bundle or argument
(one line on stderr); 3 no runtime for any of the bundle's prebuilt artifacts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.backends import BACKENDS, Artifact
from edgekd.backends.base import resolve_threads
from edgekd.bundle.checksums import SUMS_FILE, modified_files, read_sums
from edgekd.bundle.verify import check_manifest, read_manifest
from edgekd.errors import BundleError, EdgekdError
from edgekd.profile.accuracy import evaluate_classifier
from edgekd.profile.engine_build import build_engines
from edgekd.profile.latency import MemoryWindow, measure_latency, peak_rss_mb

EVAL_BATCH = 256
EXIT_BAD_INPUT = 2
EXIT_NO_RUNTIME = 3
_RUNTIMES = ("numpy", "onnxruntime", "openvino", "tensorrt")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_info() -> dict[str, Any]:
    """Where the numbers were measured: hostname, arch, OS, CPU and the runtime versions installed."""
    versions: dict[str, str | None] = {}
    for name in _RUNTIMES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "hostname": socket.gethostname(),
        "arch": platform.machine(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "runtimes": versions,
    }


def _load_bundle(bundle: Path) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    sums = read_sums(bundle)
    changed = modified_files(bundle, sums)
    if changed:
        raise BundleError(f"{bundle / changed[0]}: does not match {SUMS_FILE} (damaged in transfer?)")
    # every path the manifest names must stay inside the bundle, every field it uses be well-formed
    manifest = check_manifest(bundle, read_manifest(bundle), set(sums))
    eval_set = manifest.get("eval_set")
    if eval_set is None:
        return manifest, None
    with np.load(bundle / eval_set["file"]) as arrays:
        return manifest, {key: arrays[key] for key in arrays.files}


def _model_input(manifest_inputs: list[dict[str, Any]], batch: int) -> np.ndarray:
    spec = manifest_inputs[0]
    shape = [batch, *(dim if isinstance(dim, int) and dim > 0 else 1 for dim in spec["shape"][1:])]
    return np.random.default_rng(0).standard_normal(shape).astype(spec["dtype"])


def profile_bundle(
    bundle: Path, warmup: int, iterations: int, batch: int, threads: int | None, hint: str
) -> dict[str, Any]:
    """Latency and accuracy of each artifact of ``bundle`` (after building the engines it leaves to
    the device) whose runtime is installed here."""
    manifest, eval_arrays = _load_bundle(bundle)
    built, skipped, build = build_engines(bundle, manifest)
    records = [*manifest["artifacts"], *built]
    if not records and build is None:
        raise BundleError(f"{bundle} holds no artifact and no engine to build on the device")
    count = resolve_threads(threads)
    rows = []
    for record in records:
        backend = BACKENDS.get(record["backend"])() if record["backend"] in BACKENDS else None
        ok, why = backend.available() if backend else (False, f"no backend {record['backend']!r}")
        if not ok:
            skipped.append({key: record[key] for key in ("file", "backend", "precision")} | {"reason": why})
            continue
        options = {"hint": hint} if backend.hints else {}
        artifact = Artifact(
            bundle / record["file"], record["backend"], record["precision"], record.get("metadata", {})
        )
        memory = MemoryWindow().start()
        runner = backend.load(artifact, threads=count, **options)
        if eval_arrays is not None:
            sample = np.ascontiguousarray(eval_arrays["x"][:batch])
        else:
            sample = _model_input(record["inputs"], batch)
        latency = measure_latency(runner, sample, warmup, iterations)
        peak = memory.stop(runner)  # loading and the timed runs, before the larger accuracy batches
        accuracy, detections = None, None
        if eval_arrays is not None and manifest.get("postprocessing") is not None:
            accuracy, detections = _detection_accuracy(
                bundle / record["file"], record, manifest, eval_arrays, count, runner
            )
        elif eval_arrays is not None:
            accuracy = evaluate_classifier(
                runner, eval_arrays["x"], eval_arrays["y"], EVAL_BATCH, groups=eval_arrays.get("groups")
            )
        info = {**runner.info, "artifact": record["file"]}
        rows.append(
            {
                "file": record["file"],
                "backend": record["backend"],
                "precision": record["precision"],
                "size_bytes": record["size_bytes"],
                "accuracy": accuracy,
                "latency": latency,
                "memory": peak,
                "runtime_info": info,
                **({"detections": detections} if detections is not None else {}),
            }
        )
    return {
        "edgekd_device_profile": 1,
        "device": device_info(),
        "bundle": {"target": manifest["target"]["name"], "created": manifest["created"]},
        "eval_frames": None if eval_arrays is None else len(eval_arrays["x"]),
        "rows": rows,
        "skipped": skipped,
        "engine_build": build,
        "peak_rss_mb": peak_rss_mb(),
    }


def _detection_accuracy(
    path: Path,
    record: dict[str, Any],
    manifest: dict[str, Any],
    arrays: dict[str, np.ndarray],
    threads: int,
    loaded: Any = None,
) -> tuple[dict[str, Any] | None, dict[str, list]]:
    """A detector (the manifest has ``postprocessing``): its outputs over ``eval.npz``, post-processed
    as the manifest says; the mAP record when faster-coco-eval is installed here, and the packed
    detections either way (the host can score them against the same ground truth)."""
    from edgekd.profile import detection_post

    runner = detection_post.OutputsRunner(str(path), record["backend"], threads, loaded)
    found = detection_post.detect(runner, arrays["x"], manifest["postprocessing"], EVAL_BATCH)
    return detection_post.score(arrays, found, list(manifest["labels"])), detection_post.pack(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgekd.profile.device_runner", description=__doc__)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("out", type=Path, help="JSON file written with the results")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--hint", default="latency", help="performance hint for runtimes that take one")
    args = parser.parse_args(argv)
    try:
        result = profile_bundle(
            args.bundle, args.warmup, args.iterations, args.batch, args.threads, args.hint
        )
    except EdgekdError as exc:
        print(f"edgekd-device: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not result["rows"] and result["engine_build"] is None:
        reasons = "; ".join(f"{item['file']}: {item['reason']}" for item in result["skipped"])
        print(f"edgekd-device: error: no runtime here loads any artifact ({reasons})", file=sys.stderr)
        return EXIT_NO_RUNTIME
    args.out.write_text(json.dumps(result, indent=2, default=lambda o: o.tolist()) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
