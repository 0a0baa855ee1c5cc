"""A peer tool's own environment for a benchmark: a ``pip install --target`` folder on PYTHONPATH.

Peer tools (torchdistill, Olive) are never project dependencies: a benchmark installs them with
``--no-deps`` into ``benchmarks/.envs/<tool>`` and runs them in a subprocess of this same interpreter
(the same torch, numpy and onnxruntime), with that folder first on ``PYTHONPATH``.

The folder is built by ONE ``pip install --target`` call holding every requirement, into a fresh
sibling folder that is renamed into place when pip succeeds. pip cannot add to a target that already
holds a top-level folder ("Target directory ... already exists"), so installing requirements one call
at a time drops whatever a later distribution puts into a shared namespace folder (``opentelemetry``
of opentelemetry-api and opentelemetry-sdk); one call merges them before anything is moved. The
folder's ``edgekd-side-env.json`` records the requirements asked for and every distribution pip put
there (name and version); a folder whose record differs from the requirements asked for now (or that
has no record: a partial or older install) is rebuilt from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

MANIFEST = "edgekd-side-env.json"


class SideEnvironment:
    """The folder ``path`` as an extra import location, plus ``extra_env`` variables for the worker."""

    def __init__(self, path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.path = path
        self.extra_env = dict(extra_env or {})

    def env(self) -> dict[str, str]:
        """The environment of a worker process: this folder first on PYTHONPATH."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.path), env.get("PYTHONPATH")]))
        env.update(self.extra_env)
        return env

    def importable(self, module: str) -> bool:
        """Whether a worker can import ``module`` (from the .venv or this folder)."""
        probe = subprocess.run(
            [sys.executable, "-c", f"import {module}"], capture_output=True, env=self.env()
        )
        return probe.returncode == 0

    @staticmethod
    def missing_from_base(modules: Sequence[str]) -> list[str]:
        """The modules of ``modules`` this interpreter cannot import without any side folder (one probe)."""
        code = (
            "import importlib, json, sys\n"
            "missing = []\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception:\n"
            "        missing.append(name)\n"
            "print(json.dumps(missing))\n"
        )
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        probe = subprocess.run(
            [sys.executable, "-c", code, *modules], capture_output=True, text=True, env=env, check=True
        )
        return json.loads(probe.stdout.strip().splitlines()[-1])

    def record(self) -> dict[str, Any] | None:
        """The folder's install record (requirements, distributions), or None when it has none."""
        try:
            return json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def ensure(self, requirements: Sequence[str], forbidden: Sequence[str] = ()) -> dict[str, Any]:
        """The folder holding exactly ``requirements`` (``--no-deps``), built in one pip call if needed.

        ``forbidden``: top-level names the folder must not hold (torch, numpy, ...: the worker must use
        this interpreter's own). Returns the install record plus ``installed_now``.
        """
        wanted = list(requirements)
        current = self.record()
        if current is not None and current.get("requirements") == wanted:
            return {**current, "path": str(self.path), "installed_now": False}
        build = self.path.with_name(f"{self.path.name}.building-{os.getpid()}")
        shutil.rmtree(build, ignore_errors=True)
        build.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
            str(build),
            *wanted,
        ]
        try:
            subprocess.run(command, check=True)
            present = [name for name in forbidden if (build / name).exists()]
            if present:
                raise RuntimeError(
                    f"pip put its own {', '.join(present)} into {self.path}; a requirement of {wanted} "
                    "must not bring these (the worker uses this interpreter's)"
                )
            record = {
                "requirements": wanted,
                "pip_command": " ".join(["python", *command[1:]]).replace(str(build), str(self.path)),
                "pip": _pip_version(),
                "python": sys.version.split()[0],
                "distributions": _distributions(build),
            }
            (build / MANIFEST).write_text(json.dumps(record, indent=2), encoding="utf-8")
            shutil.rmtree(self.path, ignore_errors=True)
            build.rename(self.path)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        return {**record, "path": str(self.path), "installed_now": True}


def _distributions(folder: Path) -> dict[str, str]:
    """``{name: version}`` of every distribution pip installed into ``folder`` (its dist-info METADATA)."""
    found = {}
    for metadata in sorted(folder.glob("*.dist-info/METADATA")):
        headers = HeaderParser().parsestr(metadata.read_text(encoding="utf-8", errors="replace"))
        found[headers["Name"]] = headers["Version"]
    return found


def _pip_version() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, text=True, check=False
    ).stdout
    return out.split()[1] if out.startswith("pip ") else out.strip()
