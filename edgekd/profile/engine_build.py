"""Build a bundle's TensorRT engines on the device that runs them (device side: standard library only).

A bundle for a TensorRT target carries the ONNX files and ``build_engine.sh`` but no engines: its
manifest lists them under ``device_build.unbuilt``. :func:`build_engines` runs the script with bash
from an argument list (no shell line is assembled), in the bundle's folder, then returns an artifact
record for each engine it produced and, for each engine it did not, why in one line
(``not built on <host>: ...``; a device without trtexec gets the script's own install hint).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from edgekd.backends.trtexec import EXIT_NO_TRTEXEC, SCRIPT_FILE

LOG_LINES = 40  # lines of the script's output kept in the result, for a failed build


def pending_engines(bundle: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's engines to build on the device whose file is not in ``bundle`` yet."""
    unbuilt = (manifest.get("device_build") or {}).get("unbuilt", [])
    return [item for item in unbuilt if not (bundle / Path(item["engine"]).name).is_file()]


def _last_line(*texts: str) -> str:
    for text in texts:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return ""


def run_build_script(bundle: Path) -> dict[str, Any]:
    """Run ``bundle/build_engine.sh`` with bash; exit code, seconds, the last output lines, and
    ``why`` (one line, None on success)."""
    started = time.perf_counter()
    try:
        done = subprocess.run(["bash", SCRIPT_FILE], cwd=bundle, capture_output=True, text=True)
    except FileNotFoundError:
        return {"exit_code": None, "seconds": 0.0, "log": [], "why": "bash not found on the device"}
    log = (done.stdout + done.stderr).splitlines()[-LOG_LINES:]
    why = None
    if done.returncode == EXIT_NO_TRTEXEC:
        why = _last_line(done.stderr)
    elif done.returncode != 0:
        why = f"{SCRIPT_FILE} failed (exit {done.returncode}): {_last_line(done.stderr, done.stdout)}"
    seconds = round(time.perf_counter() - started, 2)
    return {"exit_code": done.returncode, "seconds": seconds, "log": log, "why": why}


def build_engines(
    bundle: Path, manifest: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None]:
    """Build the bundle's pending engines: (artifact records, not built, the build's record or None).

    Artifact records have the manifest's artifact fields (``file``, ``backend``, ``precision``,
    ``size_bytes``, ``inputs``) plus the ``metadata`` TensorRT needs to load the engine; each not-built
    entry has ``file``, ``backend``, ``precision`` and ``reason``.
    """
    pending = pending_engines(bundle, manifest)
    if not pending:
        return [], [], None
    build = {"script": SCRIPT_FILE, **run_build_script(bundle)}
    host = socket.gethostname()
    built, failed = [], []
    for item in pending:
        engine = bundle / Path(item["engine"]).name
        fields = {"file": engine.name, "backend": item["backend"], "precision": item["precision"]}
        if not engine.is_file():
            why = build["why"] or f"{SCRIPT_FILE} finished without writing it"
            failed.append({**fields, "reason": f"not built on {host}: {why}"})
            continue
        metadata = {"dla_core": item.get("dla_core"), "profile": item.get("profile")}
        size = engine.stat().st_size
        built.append({**fields, "size_bytes": size, "inputs": item.get("inputs"), "metadata": metadata})
    build["built"] = [record["file"] for record in built]
    return built, failed, build
