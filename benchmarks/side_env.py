"""A peer tool's own environment for a benchmark: a ``pip install --target`` folder on PYTHONPATH.

Peer tools (torchdistill, Olive) are never project dependencies: a benchmark installs them with
``--no-deps`` into ``benchmarks/.envs/<tool>`` and runs them in a subprocess of this same interpreter
(the same torch, numpy and onnxruntime), with that folder first on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


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

    def pip_install(self, *requirements: str) -> None:
        """``pip install --target <folder> --no-deps`` (never pulls in another torch or numpy)."""
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
                str(self.path),
                "--no-deps",
                *requirements,
            ],
            check=True,
        )
