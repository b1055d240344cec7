"""Assemble the guest stubs in guests/stubs/ at test time (never committed as binaries)."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

STUB_DIR = Path(__file__).resolve().parents[2] / "guests" / "stubs"
#: Where the stubs are linked (and must be loaded).
CODE_BASE = 0x100000
#: Guest RAM map shared by the stubs (see guests/stubs/stub.inc).
BOOT_INFO = 0x10000
SCRATCH = 0x11000
RAM_SIZE = 4 << 20


def kernel_stack(index: int) -> int:
    """Top of vCPU ``index``'s kernel stack (also its TSS.RSP0)."""
    return 0x70000 - index * 0x4000


def tools_missing() -> str | None:
    """Why stubs cannot be built here, or None."""
    missing = [tool for tool in ("as", "ld") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)} (apt-get install binutils)" if missing else None


@cache
def build(name: str, out_dir: Path, base: int = CODE_BASE) -> bytes:
    """Assemble and link ``guests/stubs/<name>.s`` as a flat binary at ``base``."""
    src = STUB_DIR / f"{name}.s"
    obj = out_dir / f"{name}.o"
    binary = out_dir / f"{name}.bin"
    subprocess.run(["as", "--64", "-I", str(STUB_DIR), "-o", str(obj), str(src)], check=True)
    link = ["ld", f"-Ttext={base:#x}", "--oformat", "binary", "-e", "_start"]
    subprocess.run([*link, "-o", str(binary), str(obj)], check=True)
    return binary.read_bytes()


@cache
def symbols(name: str, out_dir: Path) -> dict[str, int]:
    """Symbol addresses of a stub (linked once more as ELF and read with nm)."""
    obj = out_dir / f"{name}.o"
    build(name, out_dir)
    elf = out_dir / f"{name}.elf"
    subprocess.run(
        ["ld", f"-Ttext={CODE_BASE:#x}", "-e", "_start", "-o", str(elf), str(obj)], check=True
    )
    out = subprocess.run(["nm", str(elf)], check=True, capture_output=True, text=True).stdout
    table: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            table[parts[2]] = int(parts[0], 16)
    return table
