"""A bzImage: its setup header, and the vmlinux inside it (decompressed in Python).

vmce enters the decompressed kernel at ``startup_64`` directly (the 64-bit boot protocol),
skipping the bzImage's own decompressor, which would run in KVM's instruction emulator on
kvm_pvm hosts (feasibility.md 4: minutes saved).
"""

from __future__ import annotations

import gzip
import lzma
import struct
from dataclasses import dataclass

from vmce.guest.elf import ElfError, ElfImage

HDRS = 0x53726448  # "HdrS"
MIN_VERSION = 0x020C  # xloadflags and the 64-bit entry
SETUP_HEADER = 0x1F1


class KernelError(ValueError):
    """Not a usable kernel image; the message says what is wrong."""


@dataclass(frozen=True)
class SetupHeader:
    """The fields of the setup header vmce reads (boot.rst)."""

    setup_sects: int
    version: int
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    xloadflags: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    init_size: int
    raw: bytes  # the header bytes, 0x1f1 .. end of header, copied into boot_params

    @property
    def setup_size(self) -> int:
        return ((self.setup_sects or 4) + 1) * 512


def parse_header(image: bytes) -> SetupHeader:
    if len(image) < 0x270:
        raise KernelError("file too short to be a bzImage")
    (boot_flag,) = struct.unpack_from("<H", image, 0x1FE)
    magic, version = struct.unpack_from("<IH", image, 0x202)
    if boot_flag != 0xAA55 or magic != HDRS:
        raise KernelError("not a bzImage (no 'HdrS' setup header)")
    if version < MIN_VERSION:
        raise KernelError(f"boot protocol {version:#x} is too old (need >= {MIN_VERSION:#x})")
    end = 0x202 + image[0x201]
    (xloadflags,) = struct.unpack_from("<H", image, 0x236)
    if not xloadflags & 1:
        raise KernelError("not a 64-bit kernel (XLF_KERNEL_64 clear)")
    return SetupHeader(
        setup_sects=image[0x1F1],
        version=version,
        loadflags=image[0x211],
        initrd_addr_max=struct.unpack_from("<I", image, 0x22C)[0],
        kernel_alignment=struct.unpack_from("<I", image, 0x230)[0],
        xloadflags=xloadflags,
        cmdline_size=struct.unpack_from("<I", image, 0x238)[0],
        payload_offset=struct.unpack_from("<I", image, 0x248)[0],
        payload_length=struct.unpack_from("<I", image, 0x24C)[0],
        init_size=struct.unpack_from("<I", image, 0x260)[0],
        raw=image[SETUP_HEADER:end],
    )


def decompress(payload: bytes) -> bytes:
    """The vmlinux ELF inside a bzImage payload (xz or lzma; other formats refused)."""
    if payload.startswith(b"\xfd7zXZ\x00"):
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elif payload[:3] == b"\x5d\x00\x00":
        d = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)
    elif payload.startswith(b"\x1f\x8b"):
        return gzip.decompress(payload)
    else:
        kind = {b"\x28\xb5\x2f\xfd": "zstd", b"\x02\x21\x4c\x18": "lz4", b"BZh": "bzip2"}
        name = next((v for k, v in kind.items() if payload.startswith(k)), "an unknown format")
        raise KernelError(f"kernel payload is compressed with {name}; vmce reads xz and gzip")
    try:
        return d.decompress(payload)
    except lzma.LZMAError as e:
        raise KernelError(f"cannot decompress the kernel payload: {e}") from None


@dataclass(frozen=True)
class Kernel:
    """A bzImage, ready to load: its header and the decompressed vmlinux."""

    header: SetupHeader
    vmlinux: ElfImage
    config: str | None = None

    @classmethod
    def parse(cls, image: bytes) -> Kernel:
        h = parse_header(image)
        start = h.setup_size + h.payload_offset
        payload = image[start : start + h.payload_length]
        if len(payload) != h.payload_length:
            raise KernelError("the kernel payload runs past the end of the file")
        try:
            elf = ElfImage.parse(decompress(payload), "vmlinux")
        except ElfError as e:
            raise KernelError(f"the decompressed kernel is not an ELF: {e}") from None
        return cls(h, elf)
