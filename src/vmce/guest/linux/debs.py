"""Debian packages as guest material: download with apt-get, unpack in Python.

A ``.deb`` is an ``ar`` archive whose ``data.tar.*`` member holds the files; both formats are
read here with the standard library (``tarfile`` handles xz, gzip and bzip2; zstd is refused
with a clear message).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

AR_MAGIC = b"!<arch>\n"
AR_HEADER = 60


class MaterialError(RuntimeError):
    """Guest material is missing or unusable; the message says what to do."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    path: Path


def download(name: str, dest: Path) -> Package:
    """``apt-get download NAME`` into ``dest``; the package file and its version."""
    if shutil.which("apt-get") is None:
        raise MaterialError("apt-get is not available: pass the .deb files with --kernel/--busybox")
    dest.mkdir(parents=True, exist_ok=True)
    r = _apt_download(name, dest)
    if r.returncode != 0 and "Unable to locate" in r.stderr:
        # A fresh machine may have no package lists yet: fetch them once and try again.
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
        r = _apt_download(name, dest)
    if r.returncode != 0:
        hint = (
            "run 'apt-get update' first, or check the network"
            if "Unable to locate" in (r.stderr) or "Failed to fetch" in r.stderr
            else "see apt-get's message"
        )
        raise MaterialError(f"apt-get download {name} failed ({hint}): {r.stderr.strip()[-400:]}")
    found = sorted(dest.glob(f"{name}_*.deb"))
    if not found:
        raise MaterialError(f"apt-get download {name} left no {name}_*.deb in {dest}")
    return from_file(found[-1])


def _apt_download(name: str, dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", "download", name], cwd=dest, capture_output=True, text=True, check=False
    )


def from_file(path: Path) -> Package:
    """A package file given by the user: name and version from its file name."""
    if not path.exists():
        raise MaterialError(f"{path}: no such file")
    parts = path.name.removesuffix(".deb").split("_")
    if len(parts) < 2:
        raise MaterialError(f"{path}: not a Debian package file name (NAME_VERSION_ARCH.deb)")
    return Package(parts[0], parts[1].replace("%3a", ":"), path)


def ar_members(blob: bytes, name: str = "<deb>") -> dict[str, bytes]:
    """The members of an ``ar`` archive by name."""
    if not blob.startswith(AR_MAGIC):
        raise MaterialError(f"{name}: not a Debian package (no ar header)")
    out: dict[str, bytes] = {}
    off = len(AR_MAGIC)
    while off + AR_HEADER <= len(blob):
        header = blob[off : off + AR_HEADER]
        member = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise MaterialError(f"{name}: corrupt ar header at offset {off}") from None
        start = off + AR_HEADER
        out[member] = blob[start : start + size]
        off = start + size + (size & 1)
    return out


def extract(pkg: Package, wanted: list[str]) -> dict[str, bytes]:
    """Files from the package's data archive, by path inside the package (``./boot/...``).

    A wanted name ending in ``*`` matches by prefix.
    """
    members = ar_members(pkg.path.read_bytes(), str(pkg.path))
    data_name = next((m for m in members if m.startswith("data.tar")), None)
    if data_name is None:
        raise MaterialError(f"{pkg.path}: no data.tar member")
    if data_name.endswith(".zst"):
        raise MaterialError(f"{pkg.path}: zstd-compressed packages are not supported")
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
        for info in tar:
            path = info.name.removeprefix("./")
            for want in wanted:
                hit = path.startswith(want[:-1]) if want.endswith("*") else path == want
                if hit and info.isfile():
                    f = tar.extractfile(info)
                    if f is not None:
                        found[path] = f.read()
    return found
