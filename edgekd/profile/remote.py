"""Profile a bundle on a remote device over SSH (OpenSSH client, key auth, host key checked).

One ``ssh`` call streams a tar of the bundle plus the device-side profiler (the numpy-only edgekd
modules in :data:`RUNNER_FILES`) to a temporary directory on the device, runs
``python -m edgekd.profile.device_runner`` there (which first builds the TensorRT engines a bundle
leaves to the device, running its ``build_engine.sh``), prints its JSON back and removes the directory.
ssh always runs with ``BatchMode=yes`` (never prompts) and ``StrictHostKeyChecking=yes`` (an unknown or
changed host key is an error, never accepted silently), from an argument list (no local shell).
Every failure is one :class:`DeviceError` line saying what to do.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekd.errors import DeviceError

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # .../edgekd
# The device-side profiler and everything it imports: standard library + numpy + the runtime only.
RUNNER_FILES = (
    "__init__.py",
    "errors.py",
    "registry.py",
    "atomic.py",
    "hashing.py",
    "threads.py",
    "backends/*.py",
    "bundle/__init__.py",
    "bundle/carray.py",
    "bundle/checksums.py",
    "bundle/verify.py",
    "profile/__init__.py",
    "profile/accuracy.py",
    "profile/latency.py",
    "profile/layers.py",
    "profile/device_runner.py",
    "profile/detection_post.py",
    "detection/__init__.py",
    "detection/metrics.py",
    "profile/engine_build.py",
)
EXIT_SSH = 255  # ssh's own failures (connection, authentication, host key)
EXIT_NO_PYTHON = 127
EXIT_NO_RUNTIME = 3  # device_runner: no runtime for any artifact

_ADDRESS = re.compile(
    r"^(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>\d+))?$"
)


@dataclass(frozen=True)
class DeviceAddress:
    """``user@host[:port]`` (host may be ``[ipv6]``)."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> DeviceAddress:
        match = _ADDRESS.match(text.strip())
        if match is None or match["host"].startswith("-"):
            raise DeviceError(f"device {text!r}: expected user@host[:port], e.g. pi@192.168.1.20:22")
        port = int(match["port"]) if match["port"] else None
        if port is not None and not 0 < port < 65536:
            raise DeviceError(f"device {text!r}: port {port} is out of range 1-65535")
        return cls(match["host"].strip("[]"), match["user"], port)

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def keyscan(self) -> str:
        """The command that prints this host's keys, for the user to check and add."""
        port = f"-p {self.port} " if self.port else ""
        return f"ssh-keyscan {port}{self.host}"

    def __str__(self) -> str:
        return self.destination + (f":{self.port}" if self.port else "")


@dataclass(frozen=True)
class SshOptions:
    known_hosts: Path | None = None
    identity_file: Path | None = None
    connect_timeout_s: int = 10
    timeout_s: int = 1800
    remote_python: str = "python3"


def ssh_command(address: DeviceAddress, options: SshOptions, remote_command: str) -> list[str]:
    """The ssh argument list: batch mode, strict host key checking, connect timeout, then the command."""
    command = [
        "ssh",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"ConnectTimeout={options.connect_timeout_s}",
    ]  # fmt: skip
    if options.known_hosts is not None:
        command += ["-o", f"UserKnownHostsFile={_option_path(options.known_hosts, 'device.known_hosts')}"]
        command += ["-o", "GlobalKnownHostsFile=/dev/null"]
    if options.identity_file is not None:
        command += ["-i", str(options.identity_file), "-o", "IdentitiesOnly=yes"]
    if address.port is not None:
        command += ["-p", str(address.port)]
    return [*command, "--", address.destination, remote_command]


def _option_path(path: Path, field: str) -> str:
    if not path.is_file():
        raise DeviceError(f"{field} {path}: no such file; pass an existing known_hosts file")
    text = str(path.resolve())
    if any(char in text for char in "\"' \t"):
        raise DeviceError(f"{field} {path}: ssh cannot take a path with quotes or spaces here; move the file")
    return text


def remote_script(python: str, protocol: dict[str, Any]) -> str:
    """POSIX sh run on the device: unpack stdin to a temp dir, profile, print the JSON, clean up."""
    py = shlex.quote(python)
    args = " ".join(shlex.quote(f"--{key}={value}") for key, value in protocol.items() if value is not None)
    script = (
        'd=$(mktemp -d "${TMPDIR:-/tmp}/edgekd.XXXXXX") || exit 1; trap \'rm -rf "$d"\' EXIT; '
        'tar -xf - -C "$d" || exit 1; '
        f"command -v {py} >/dev/null 2>&1 || exit 127; "
        f'PYTHONPATH="$d/runner" {py} -m edgekd.profile.device_runner "$d/bundle" "$d/result.json" '
        f'{args} >&2 && cat "$d/result.json"'
    )
    return "sh -c " + shlex.quote(script)


def payload(bundle: Path) -> bytes:
    """A tar of ``bundle/`` (the bundle's files) and ``runner/edgekd/`` (the device-side profiler)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(bundle.iterdir()):
            tar.add(path, arcname=f"bundle/{path.name}")
        for pattern in RUNNER_FILES:
            for path in sorted(PACKAGE_ROOT.glob(pattern)):
                tar.add(path, arcname=f"runner/edgekd/{path.relative_to(PACKAGE_ROOT)}")
    return buffer.getvalue()


def _ssh_failure(address: DeviceAddress, options: SshOptions, stderr: str) -> DeviceError:
    """One line for ssh's own failures (exit 255): host key, authentication, reachability."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else "ssh failed without a message"
    known = str(options.known_hosts) if options.known_hosts else "~/.ssh/known_hosts"
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        return DeviceError(
            f"device {address}: its host key does NOT match the one in {known} (a reinstalled device, or "
            f"someone in between); if expected, remove it with ssh-keygen -R and re-add it: "
            f"{address.keyscan} >> {known} (check the fingerprint first)"
        )
    if "Host key verification failed" in stderr or "host key is known" in stderr:
        return DeviceError(
            f"device {address}: host key unknown (not in {known}); check the device's fingerprint and "
            f"add it: {address.keyscan} >> {known}"
        )
    if "Permission denied" in stderr:
        return DeviceError(
            f"device {address}: SSH key authentication failed ({last}); install your public key on the "
            f"device (ssh-copy-id) or set device.identity_file"
        )
    return DeviceError(f"device {address} is unreachable: {last}; check the address, port and that sshd runs")


def _remote_failure(address: DeviceAddress, options: SshOptions, code: int, stderr: str) -> DeviceError:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit code {code}"
    missing = re.search(r"No module named '([^']+)'", stderr)
    if code == EXIT_NO_PYTHON:
        return DeviceError(
            f"device {address}: python {options.remote_python!r} not found; install python3 with numpy and "
            f"the runtime there, or set device.remote_python"
        )
    if missing:
        return DeviceError(
            f"device {address}: {options.remote_python} cannot import {missing.group(1)}; install it on the "
            f"device (pip install {missing.group(1).split('.')[0]})"
        )
    if code == EXIT_NO_RUNTIME:
        return DeviceError(
            f"device {address}: runtime missing: {last.removeprefix('edgekd-device: error: ')}"
        )
    return DeviceError(f"device {address}: remote profiling failed (exit {code}): {last}")


def profile_remote(
    bundle: Path, address: DeviceAddress, options: SshOptions, protocol: dict[str, Any]
) -> dict[str, Any]:
    """Run the device-side profiler on ``bundle`` over SSH; its JSON result (see device_runner).

    ``protocol``: warmup, iterations, batch, threads, hint (as device_runner's options).
    """
    command = ssh_command(address, options, remote_script(options.remote_python, protocol))
    try:
        done = subprocess.run(command, input=payload(bundle), capture_output=True, timeout=options.timeout_s)
    except FileNotFoundError:
        raise DeviceError("ssh not found on this machine; install the OpenSSH client") from None
    except subprocess.TimeoutExpired:
        raise DeviceError(
            f"device {address}: no result within device.timeout_s={options.timeout_s} s (engine builds "
            f"on the device count too); raise it or lower profile.iterations"
        ) from None
    stderr = done.stderr.decode("utf-8", errors="replace")
    if done.returncode == EXIT_SSH:
        raise _ssh_failure(address, options, stderr)
    if done.returncode != 0:
        raise _remote_failure(address, options, done.returncode, stderr)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise DeviceError(
            f"device {address}: the profiler's output is not JSON: {done.stdout[:200]!r}"
        ) from None
