"""Guest material for the Linux guest: a Debian kernel and busybox, cached outside the repo.

``prepare()`` downloads the pinned packages with ``apt-get download`` (or takes local .deb
files), checks that the kernel can take machine checks (X86_MCE, X86_MCE_INTEL/AMD,
X86_MPPARSE, MEMORY_FAILURE: Debian's cloud flavour lacks them), builds the initramfs, and
keeps kernel, config and initramfs under ``$XDG_CACHE_HOME/vmce/linux/<kernel>/`` with a
manifest of versions and hashes. Once cached it works offline; a cache that fails its hashes
is rebuilt, never half-used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from vmce.guest.linux.bzimage import Kernel, KernelError
from vmce.guest.linux.debs import MaterialError, Package, download, extract, from_file
from vmce.guest.linux.initramfs import Initramfs
from vmce.guest.testguest import cache_dir

#: The pinned packages: Debian bookworm's generic amd64 kernel (not the cloud flavour).
KERNEL_PACKAGE = "linux-image-6.1.0-56-amd64"
BUSYBOX_PACKAGE = "busybox-static"
REQUIRED_CONFIG = (
    "CONFIG_X86_MCE",
    "CONFIG_X86_MCE_INTEL",
    "CONFIG_X86_MCE_AMD",
    "CONFIG_X86_MPPARSE",
    "CONFIG_MEMORY_FAILURE",
)

INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "INIT: hello from /init"
grep processor /proc/cpuinfo
dmesg | grep -i mce
n=0
while true; do
  n=$((n+1))
  echo "INIT: alive $n $(grep HardwareCorrupted /proc/meminfo)"
  sleep 2
done
"""


@dataclass(frozen=True)
class Manifest:
    kernel_package: str
    kernel_version: str
    busybox_package: str
    busybox_version: str
    vmlinuz_sha256: str
    initramfs_sha256: str


@dataclass(frozen=True)
class Material:
    """Paths of a prepared, verified kernel and initramfs."""

    directory: Path
    vmlinuz: Path
    initramfs: Path
    manifest: Manifest

    @property
    def key(self) -> str:
        return f"{self.manifest.kernel_version}-{self.manifest.initramfs_sha256[:12]}"

    def kernel(self) -> Kernel:
        return Kernel.parse(self.vmlinuz.read_bytes())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def linux_cache() -> Path:
    return cache_dir() / "linux"


def check_config(config: str, source: str) -> None:
    """Refuse a kernel that cannot take machine checks or find CPUs from an MP table."""
    enabled = {ln.split("=")[0] for ln in config.splitlines() if ln.endswith(("=y", "=m"))}
    missing = [c for c in REQUIRED_CONFIG if c not in enabled]
    if missing:
        hint = (
            " (the cloud flavour lacks them; use linux-image-*-amd64)"
            if "cloud" in (source)
            else ""
        )
        raise MaterialError(f"{source}: kernel lacks {', '.join(missing)}{hint}")


def cached(directory: Path) -> Material | None:
    """The material in ``directory`` if its manifest and hashes check out."""
    try:
        m = Manifest(**json.loads((directory / "manifest.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    vmlinuz, initrd = directory / "vmlinuz", directory / "initramfs.cpio"
    try:
        if _sha(vmlinuz) != m.vmlinuz_sha256 or _sha(initrd) != m.initramfs_sha256:
            return None
    except OSError:
        return None
    return Material(directory, vmlinuz, initrd, m)


def cached_material() -> Material | None:
    """The prepared material of the pinned kernel, if the cache has it (never downloads)."""
    for d in sorted(linux_cache().glob(f"{KERNEL_PACKAGE.removeprefix('linux-image-')}*")):
        hit = cached(d)
        if hit is not None and hit.manifest.kernel_package == KERNEL_PACKAGE:
            return hit
    return None


def prepare(
    kernel_deb: Path | None = None, busybox_deb: Path | None = None, *, refresh: bool = False
) -> Material:
    """Kernel and initramfs, from the cache or freshly prepared."""
    root = linux_cache()
    if kernel_deb is None and not refresh:
        hit = cached_material()
        if hit is not None:
            return hit
    with tempfile.TemporaryDirectory(prefix="vmce-debs-") as tmp:
        kpkg = from_file(kernel_deb) if kernel_deb else download(KERNEL_PACKAGE, Path(tmp))
        bpkg = from_file(busybox_deb) if busybox_deb else download(BUSYBOX_PACKAGE, Path(tmp))
        return _build(root, kpkg, bpkg)


def _build(root: Path, kpkg: Package, bpkg: Package) -> Material:
    files = extract(kpkg, ["boot/vmlinuz-*", "boot/config-*"])
    vmlinuz = next((v for k, v in files.items() if "vmlinuz" in k), None)
    config = next((v for k, v in files.items() if "/config-" in k), None)
    if vmlinuz is None:
        raise MaterialError(f"{kpkg.path}: no /boot/vmlinuz-* inside: not a kernel package")
    if config is not None:
        check_config(config.decode(errors="replace"), kpkg.name)
    try:
        Kernel.parse(vmlinuz)
    except KernelError as e:
        raise MaterialError(f"{kpkg.path}: {e}") from None
    busybox = extract(bpkg, ["bin/busybox"]).get("bin/busybox")
    if busybox is None:
        raise MaterialError(f"{bpkg.path}: no /bin/busybox inside")
    initrd = Initramfs()
    for d in ("/bin", "/sbin", "/dev", "/proc", "/sys", "/tmp"):
        initrd.dir(d)
    initrd.chardev("/dev/console", 5, 1)
    initrd.file("/bin/busybox", busybox)
    initrd.symlink("/bin/sh", "busybox")
    initrd.file("/init", INIT_SCRIPT.encode())
    name = kpkg.name.removeprefix("linux-image-") + "_" + kpkg.version
    final = root / name
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        (work / "vmlinuz").write_bytes(vmlinuz)
        if config is not None:
            (work / "config").write_bytes(config)
        (work / "initramfs.cpio").write_bytes(initrd.build())
        manifest = Manifest(
            kpkg.name,
            kpkg.version,
            bpkg.name,
            bpkg.version,
            _sha(work / "vmlinuz"),
            _sha(work / "initramfs.cpio"),
        )
        (work / "manifest.json").write_text(json.dumps(asdict(manifest), indent=2))
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    result = cached(final)
    assert result is not None
    return result
