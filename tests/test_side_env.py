"""benchmarks/side_env.py: a peer tool's folder is built by ONE pip call, recorded, and reused.

The wheels are built here (a wheel is a zip with a dist-info), so pip runs for real and offline. Two
distributions share the namespace folder ``edgekdns`` as opentelemetry-api and opentelemetry-sdk share
``opentelemetry``: installed one ``--target`` call at a time, the second one's part of it is dropped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from side_env import MANIFEST, SideEnvironment  # noqa: E402


def _wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel holding ``files`` (path inside the wheel -> text)."""
    dist_info = f"{name}-{version}.dist-info"
    entries = {
        **files,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in entries.items():
            archive.writestr(path, text)
        archive.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return wheel


@pytest.fixture
def wheels(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "wheels"
    folder.mkdir()
    api = _wheel(folder, "edgekdns_api", "1.0", {"edgekdns/api/__init__.py": "VALUE = 1\n"})
    sdk = _wheel(folder, "edgekdns_sdk", "2.0", {"edgekdns/sdk/__init__.py": "VALUE = 2\n"})
    return api, sdk


def _imports(env: SideEnvironment, module: str) -> str:
    probe = subprocess.run(
        [sys.executable, "-c", f"import {module} as m; print(m.VALUE)"],
        capture_output=True,
        text=True,
        env=env.env(),
    )
    return probe.stdout.strip() if probe.returncode == 0 else f"error: {probe.stderr.strip()[-200:]}"


def test_one_pip_call_merges_a_shared_namespace_and_records_it(tmp_path: Path, wheels) -> None:
    api, sdk = wheels
    env = SideEnvironment(tmp_path / "envs" / "tool")
    record = env.ensure([str(api), str(sdk)])
    assert record["installed_now"] is True
    assert record["distributions"] == {"edgekdns_api": "1.0", "edgekdns_sdk": "2.0"}
    assert _imports(env, "edgekdns.api") == "1"
    assert _imports(env, "edgekdns.sdk") == "2"  # the part one-call-at-a-time installs lose
    on_disk = json.loads((env.path / MANIFEST).read_text(encoding="utf-8"))
    assert on_disk["requirements"] == [str(api), str(sdk)]
    assert not list(env.path.parent.glob("tool.building-*"))  # the build folder was renamed into place

    again = env.ensure([str(api), str(sdk)])  # same requirements: reused, no pip call
    assert again["installed_now"] is False
    assert again["distributions"] == record["distributions"]


def test_a_folder_without_a_matching_record_is_rebuilt_from_scratch(tmp_path: Path, wheels) -> None:
    api, sdk = wheels
    env = SideEnvironment(tmp_path / "tool")
    env.path.mkdir()
    (env.path / "edgekdns").mkdir()  # a partial install of an older script: no record
    (env.path / "stale.txt").write_text("left over", encoding="utf-8")
    record = env.ensure([str(api), str(sdk)])
    assert record["installed_now"] is True
    assert not (env.path / "stale.txt").exists()
    assert _imports(env, "edgekdns.sdk") == "2"

    fewer = env.ensure([str(api)])  # other requirements: rebuilt, holding only those
    assert fewer["installed_now"] is True
    assert fewer["distributions"] == {"edgekdns_api": "1.0"}
    assert _imports(env, "edgekdns.sdk").startswith("error")


def test_forbidden_top_level_names_fail_and_leave_no_folder(tmp_path: Path, wheels) -> None:
    api, _ = wheels
    env = SideEnvironment(tmp_path / "tool")
    with pytest.raises(RuntimeError, match="edgekdns"):
        env.ensure([str(api)], forbidden=("edgekdns",))
    assert not env.path.exists()
    assert not list(tmp_path.glob("tool.building-*"))


def test_missing_from_base_probes_this_interpreter_only(tmp_path: Path) -> None:
    assert SideEnvironment.missing_from_base(["json", "edgekd_no_such_module_xyz"]) == [
        "edgekd_no_such_module_xyz"
    ]
