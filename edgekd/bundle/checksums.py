"""SHA-256 checksums of a bundle's files in ``sha256sum`` format (``sha256sum -c SHA256SUMS`` checks them).

Standard library only: the device-side profiler checks a bundle with it before loading anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgekd.errors import BundleError
from edgekd.hashing import sha256_file

SUMS_FILE = "SHA256SUMS"
MANIFEST_FILE = "manifest.json"


def render_sums(directory: Path, names: list[str]) -> str:
    """``<sha256>  <name>`` lines for ``names`` (relative to ``directory``), sorted by name."""
    return "".join(f"{sha256_file(directory / name)}  {name}\n" for name in sorted(names))


def refuse_links(directory: Path) -> None:
    """BundleError naming the first entry of ``directory`` that is a symbolic link or not a regular
    file: a bundle is flat, and a link would make verify or the device load a file from outside it."""
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink():
            raise BundleError(
                f"{entry}: is a symbolic link (to {os.readlink(entry)}); a bundle holds only regular "
                f"files: replace the link with the file it names, or rebuild the bundle"
            )
        if not entry.is_file():
            raise BundleError(f"{entry}: is not a regular file (a bundle holds no directories); remove it")


def read_sums(directory: Path) -> dict[str, str]:
    """``{name: sha256}`` from ``directory/SHA256SUMS``; BundleError naming the file when unreadable.

    Symbolic links and directories inside the bundle are refused first (:func:`refuse_links`).
    """
    if directory.is_dir():
        refuse_links(directory)
    path = directory / SUMS_FILE
    if not path.is_file():
        raise BundleError(f"{directory} is not an edgekd bundle: {SUMS_FILE} is missing")
    sums: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or "/" in name or name.startswith("."):
            raise BundleError(f"{path}: line {number} is not '<sha256>  <file>' (the file was modified)")
        sums[name] = digest
    return sums


def modified_files(directory: Path, sums: dict[str, str]) -> list[str]:
    """Names whose content no longer matches ``sums`` (BundleError when a listed file is missing)."""
    missing = [name for name in sums if not (directory / name).is_file()]
    if missing:
        raise BundleError(f"{directory / missing[0]}: listed in {SUMS_FILE} but missing from the bundle")
    return [name for name, digest in sorted(sums.items()) if sha256_file(directory / name) != digest]
