"""Remote profiling over a REAL OpenSSH server started on loopback by the test (no mocks).

The "device" is this machine: sshd runs as the current user on a free port with a temporary host
key, authorized_keys and known_hosts; the remote python is this venv's. Skipped, with the reason,
where sshd is missing or cannot start.
"""

import getpass
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from edgekd.api import compress
from edgekd.backends.trtexec import EXIT_NO_TRTEXEC
from edgekd.errors import DeviceError
from edgekd.profile.remote import DeviceAddress, SshOptions, payload, profile_remote
from tests.test_bundle import TINY, tiny_run  # noqa: F401 - the shared session fixture

SSHD = Path("/usr/sbin/sshd")
PROTOCOL = {"warmup": 1, "iterations": 5, "batch": 1, "threads": 1, "hint": "latency"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    """(address, SshOptions with the right known_hosts and key) of a live loopback sshd."""
    if not SSHD.is_file() or shutil.which("ssh") is None or shutil.which("ssh-keyscan") is None:
        pytest.skip("OpenSSH server/client not installed (apt-get install openssh-server)")
    tmp = tmp_path_factory.mktemp("sshd")
    _keygen(tmp / "host_key")
    _keygen(tmp / "client_key")
    shutil.copyfile(tmp / "client_key.pub", tmp / "authorized_keys")
    port = _free_port()
    (tmp / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp / 'host_key'}\n"
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nPidFile {tmp / 'sshd.pid'}\n"
        "UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    server = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(tmp / "sshd_config")], stderr=subprocess.PIPE, text=True
    )
    scan = b""
    for _ in range(50):
        if server.poll() is not None:
            pytest.skip(f"sshd cannot start here: {server.stderr.read().strip()[-300:]}")
        scan = subprocess.run(
            ["ssh-keyscan", "-p", str(port), "-t", "ed25519", "127.0.0.1"], capture_output=True
        ).stdout
        if scan:
            break
        time.sleep(0.1)
    if not scan:
        server.kill()
        pytest.skip("sshd did not answer ssh-keyscan within 5 s")
    (tmp / "known_hosts").write_bytes(scan)
    address = DeviceAddress.parse(f"{getpass.getuser()}@127.0.0.1:{port}")
    options = SshOptions(tmp / "known_hosts", tmp / "client_key", 5, 300, sys.executable)
    yield address, options, tmp
    server.terminate()
    server.wait(timeout=10)


def test_remote_profile_of_the_bundle_over_ssh(sshd, tiny_run: Path):  # noqa: F811
    address, options, _ = sshd
    result = profile_remote(tiny_run / "bundle" / "x86-ort", address, options, PROTOCOL)
    assert result["device"]["hostname"] == socket.gethostname()
    assert result["device"]["runtimes"]["onnxruntime"] and result["device"]["arch"]
    assert [row["precision"] for row in result["rows"]] == ["fp32", "int8"]
    for row in result["rows"]:
        assert 0 < row["latency"]["p50_ms"] <= row["latency"]["p99_ms"] and row["latency"]["iterations"] == 5
        assert row["latency"]["threads"] == 1 and 0 <= row["accuracy"]["accuracy"] <= 1


def test_compress_with_device_puts_device_rows_in_the_report(sshd, tiny_run: Path):  # noqa: F811
    address, options, _ = sshd
    device = _device_overrides(address, options)
    report = compress(None, [f"runs_dir={tiny_run.parent}", "name=tiny", *TINY, *device], log=lambda _: None)
    remote = [row for row in report["rows"] if "measured_on" in row]
    host = socket.gethostname()
    assert [row["name"] for row in remote] == [
        f"student (onnxruntime FP32) on {host}",
        f"student (onnxruntime INT8) on {host}",
    ]
    assert report["device"]["hostname"] == host and remote[0]["measured_on"]["python"]
    assert (
        remote[1]["accuracy"]["n"]
        == json.loads((tiny_run / "bundle/x86-ort/manifest.json").read_text())["eval_set"]["frames"]
    )
    assert report["stages"]["remote"]["cached"] is False and report["stages"]["compile"]["cached"] is True
    assert f"on {host}" in (tiny_run / "report.md").read_text()


def _device_overrides(address: DeviceAddress, options: SshOptions) -> list[str]:
    return [
        f"device.host={address}",
        f"device.known_hosts={options.known_hosts}",
        f"device.identity_file={options.identity_file}",
        f"device.remote_python={sys.executable}",
    ]


def test_jetson_bundle_builds_engines_on_the_device_and_reports_missing_trtexec(
    sshd,
    tiny_run: Path,  # noqa: F811
    tmp_path: Path,
):
    """The device runs build_engine.sh; without trtexec every engine is 'not built on <host>' in one
    line, and the run still finishes with those reasons in the remote stage and the report."""
    if shutil.which("trtexec") or Path("/usr/src/tensorrt/bin/trtexec").exists():
        pytest.skip("trtexec is installed here: the loopback 'device' would really build the engines")
    address, options, _ = sshd
    shutil.copytree(tiny_run, tmp_path / "tiny")  # teacher, student and export come from its cache
    overrides = [f"runs_dir={tmp_path}", "name=tiny", *TINY, "target=jetson"]
    report = compress(None, [*overrides, *_device_overrides(address, options)], log=lambda _: None)
    host = socket.gethostname()
    assert not [row for row in report["rows"] if "measured_on" in row]
    on_device = [item for item in report["not_measured"] if item["name"].endswith(f" on {host}")]
    assert [item["name"] for item in on_device] == [
        f"student (tensorrt {precision}) on {host}" for precision in ("FP32", "FP16", "INT8")
    ]
    for item in on_device:
        why = item["why"]
        assert why.startswith(f"not built on {host}: trtexec not found on the device's PATH"), why
        assert "install TensorRT" in why and "\n" not in why and item["profiled"] is False
    build = report["device_engine_build"]
    assert build["exit_code"] == EXIT_NO_TRTEXEC and build["built"] == []
    remote = json.loads(next((tmp_path / "tiny").glob("*-remote/stage.json")).read_text())["outputs"]
    assert remote["rows"] == [] and remote["not_measured"] == on_device
    markdown = (tmp_path / "tiny" / "report.md").read_text()
    section = markdown.split("## Not measured", 1)[1].split("\n## ", 1)[0]
    assert all(f"- {item['name']}: {item['why']}." in section for item in on_device)
    assert f"Device {host} (" in markdown and "nothing could be measured there" in markdown


def test_unknown_host_key_is_refused_with_keyscan_hint(sshd, tiny_run: Path):  # noqa: F811
    address, options, tmp = sshd
    empty = tmp / "empty_known_hosts"
    empty.write_text("")
    unknown = SshOptions(empty, options.identity_file, 5, 60, options.remote_python)
    with pytest.raises(DeviceError, match=r"host key unknown.*ssh-keyscan -p \d+ 127\.0\.0\.1"):
        profile_remote(tiny_run / "bundle" / "x86-ort", address, unknown, PROTOCOL)


def test_changed_host_key_is_refused(sshd, tiny_run: Path):  # noqa: F811
    address, options, tmp = sshd
    _keygen(tmp / "other_key")
    line = (tmp / "known_hosts").read_text().split()[0]
    wrong = tmp / "wrong_known_hosts"
    key_type, key = (tmp / "other_key.pub").read_text().split()[:2]
    wrong.write_text(f"{line} {key_type} {key}\n")
    changed = SshOptions(wrong, options.identity_file, 5, 60, options.remote_python)
    with pytest.raises(DeviceError, match="does NOT match"):
        profile_remote(tiny_run / "bundle" / "x86-ort", address, changed, PROTOCOL)


def test_wrong_key_and_missing_python_are_one_line_errors(sshd, tiny_run: Path):  # noqa: F811
    address, options, tmp = sshd
    _keygen(tmp / "stranger_key")
    stranger = SshOptions(options.known_hosts, tmp / "stranger_key", 5, 60, options.remote_python)
    with pytest.raises(DeviceError, match="key authentication failed"):
        profile_remote(tiny_run / "bundle" / "x86-ort", address, stranger, PROTOCOL)
    no_python = SshOptions(options.known_hosts, options.identity_file, 5, 60, "/nonexistent/python3")
    with pytest.raises(DeviceError, match="python '/nonexistent/python3' not found"):
        profile_remote(tiny_run / "bundle" / "x86-ort", address, no_python, PROTOCOL)


def test_unreachable_port_is_a_device_error(tiny_run: Path, tmp_path: Path):  # noqa: F811
    if shutil.which("ssh") is None:
        pytest.skip("OpenSSH client not installed")
    address = DeviceAddress.parse(f"nobody@127.0.0.1:{_free_port()}")
    with pytest.raises(DeviceError, match="unreachable"):
        profile_remote(tiny_run / "bundle" / "x86-ort", address, SshOptions(connect_timeout_s=3), PROTOCOL)


@pytest.mark.parametrize("text", ["-oProxyCommand=x", "a b@host", "user@host:99999", "user@host;rm"])
def test_bad_device_addresses_are_rejected(text: str):
    with pytest.raises(DeviceError, match="device"):
        DeviceAddress.parse(text)


def test_shipped_runner_imports_only_numpy_and_its_own_files(tiny_run: Path, tmp_path: Path):  # noqa: F811
    """The files sent to the device are enough for the profiler, and it loads no torch/onnx/pydantic."""
    with tarfile.open(fileobj=io.BytesIO(payload(tiny_run / "bundle" / "x86-ort"))) as tar:
        tar.extractall(tmp_path, filter="data")
    runner = tmp_path / "runner"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import edgekd.profile.device_runner, edgekd.backends; "
        "heavy = ('torch', 'onnx', 'pydantic', 'typer', 'yaml', 'rich'); "
        "mods = [m for m in sys.modules if m.split('.')[0] in heavy]; "
        "outside = [n for n, m in sys.modules.items() if n.startswith('edgekd') "
        "and getattr(m, '__file__', None) and not m.__file__.startswith(sys.argv[1])]; print(mods, outside)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(runner)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[] []"
