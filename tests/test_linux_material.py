"""Linux guest material without KVM: packages, initramfs, bzImage, boot parameters, cache."""

from __future__ import annotations

import io
import json
import lzma
import struct
import tarfile
from pathlib import Path

import pytest

from vmce.guest.linux import bootparams, material
from vmce.guest.linux.bzimage import Kernel, KernelError, decompress, parse_header
from vmce.guest.linux.debs import MaterialError, ar_members, extract, from_file
from vmce.guest.linux.initramfs import Initramfs
from vmce.guest.linux.material import Manifest, cached, check_config


def make_deb(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal .deb: ar archive with debian-binary and an xz data.tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = {"debian-binary": b"2.0\n", "data.tar.xz": buf.getvalue()}
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


def test_deb_round_trip(tmp_path: Path) -> None:
    deb = make_deb(tmp_path / "pkg_1.2-3_amd64.deb", {"boot/vmlinuz-x": b"K", "bin/busybox": b"B"})
    pkg = from_file(deb)
    assert (pkg.name, pkg.version) == ("pkg", "1.2-3")
    assert extract(pkg, ["boot/vmlinuz-*"]) == {"boot/vmlinuz-x": b"K"}
    assert extract(pkg, ["bin/busybox"]) == {"bin/busybox": b"B"}


def test_bad_packages(tmp_path: Path) -> None:
    with pytest.raises(MaterialError, match="no such file"):
        from_file(tmp_path / "nope_1_amd64.deb")
    junk = tmp_path / "junk_1_amd64.deb"
    junk.write_bytes(b"not an archive")
    with pytest.raises(MaterialError, match="not a Debian package"):
        extract(from_file(junk), ["x"])
    odd = tmp_path / "x.deb"
    odd.write_bytes(b"")
    with pytest.raises(MaterialError, match="not a Debian package file name"):
        from_file(odd)
    assert ar_members(b"!<arch>\n") == {}


def test_cloud_flavour_is_refused() -> None:
    cloud = "CONFIG_X86_MCE_AMD=y\n# CONFIG_X86_MCE is not set\n# CONFIG_X86_MPPARSE is not set\n"
    with pytest.raises(MaterialError, match=r"lacks CONFIG_X86_MCE, CONFIG_X86_MCE_INTEL.*cloud"):
        check_config(cloud, "linux-image-6.1.0-56-cloud-amd64")
    good = "\n".join(f"{c}=y" for c in material.REQUIRED_CONFIG)
    check_config(good, "linux-image-6.1.0-56-amd64")


def test_initramfs_is_newc() -> None:
    ir = Initramfs()
    ir.dir("/bin")
    ir.chardev("/dev/console", 5, 1)
    ir.file("/init", b"#!/bin/sh\n")
    blob = ir.build()
    assert len(blob) % 512 == 0
    entries = []
    off = 0
    while True:
        assert blob[off : off + 6] == b"070701"
        fields = [int(blob[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = blob[off + 110 : off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        data = blob[off : off + filesize]
        off = (off + filesize + 3) & ~3
        entries.append((name, fields[1], data, fields[9], fields[10]))
        if name == "TRAILER!!!":
            break
    assert [e[0] for e in entries] == ["bin", "dev/console", "init", "TRAILER!!!"]
    assert entries[1][3:] == (5, 1) and entries[2][2] == b"#!/bin/sh\n"


def fake_bzimage(payload: bytes, *, version: int = 0x020F, xload: int = 1) -> bytes:
    img = bytearray(0x1000)
    img[0x1F1] = 1  # setup_sects: setup is 2 * 512 bytes
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    img[0x201] = 0x6A
    struct.pack_into("<IH", img, 0x202, 0x53726448, version)
    struct.pack_into("<H", img, 0x236, xload)
    struct.pack_into("<I", img, 0x238, 2047)
    struct.pack_into("<II", img, 0x248, 0, len(payload))
    return bytes(img[:0x400]) + payload


def test_bzimage_errors() -> None:
    with pytest.raises(KernelError, match="too short"):
        parse_header(b"\0" * 10)
    with pytest.raises(KernelError, match="not a bzImage"):
        parse_header(b"\0" * 0x1000)
    with pytest.raises(KernelError, match="too old"):
        parse_header(fake_bzimage(b"", version=0x0200))
    with pytest.raises(KernelError, match="not a 64-bit kernel"):
        parse_header(fake_bzimage(b"", xload=0))
    with pytest.raises(KernelError, match="zstd"):
        decompress(b"\x28\xb5\x2f\xfd rest")
    with pytest.raises(KernelError, match="not an ELF"):
        Kernel.parse(fake_bzimage(lzma.compress(b"no elf here", format=lzma.FORMAT_XZ)))


def test_boot_params_layout() -> None:
    h = parse_header(fake_bzimage(b""))
    bp = bootparams.build(
        h,
        cmdline_addr=0x11000,
        initrd_addr=0x8000000,
        initrd_size=4096,
        e820=bootparams.memory_map(256 << 20),
    )
    assert len(bp) == 4096
    assert bp[0x1EF] == 0  # the sentinel is never copied
    assert bp[0x210] == 0xFF and bp[0x211] & 0x80
    assert struct.unpack_from("<I", bp, 0x228)[0] == 0x11000
    assert struct.unpack_from("<II", bp, 0x218) == (0x8000000, 4096)
    assert bp[0x1E8] == 4
    first = struct.unpack_from("<QQI", bp, 0x2D0)
    assert first == (0, 0x9FC00, 1)
    last = struct.unpack_from("<QQI", bp, 0x2D0 + 3 * 20)
    assert last == (0x100000, (256 << 20) - 0x100000, 1)


def test_corrupt_cache_is_not_used(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "initramfs.cpio").write_bytes(b"initrd")
    import hashlib

    def sha(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()

    m = Manifest("linux-image-x", "1", "busybox-static", "1", sha(b"kernel"), sha(b"initrd"))
    (tmp_path / "manifest.json").write_text(json.dumps(m.__dict__))
    assert cached(tmp_path) is not None
    (tmp_path / "initramfs.cpio").write_bytes(b"changed")
    assert cached(tmp_path) is None
    (tmp_path / "manifest.json").write_text("{not json")
    assert cached(tmp_path) is None
