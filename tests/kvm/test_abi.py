"""The ctypes layouts, enums and ioctl numbers of vmce.kvm.abi against <linux/kvm.h>.

A C program is generated that prints ``sizeof``/``offsetof`` for every declared field (recursing
into nested structs and unions) and the value of every macro; gcc compiles it against the
installed kernel headers. No /dev/kvm is needed.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmce.kvm import abi
from vmce.kvm.abi.base import KvmStruct
from vmce.kvm.abi.constants import C_CONSTANTS, C_PREFIXES

HEADER = Path("/usr/include/linux/kvm.h")


def _field_checks(cls: type, c_type: str, prefix: str, base: int) -> Iterator[tuple[str, int]]:
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for name, ftype, *_ in cls._fields_:  # type: ignore[attr-defined]
        desc = getattr(cls, name)
        path = prefix if name in anonymous else (f"{prefix}.{name}" if prefix else name)
        offset = base + desc.offset
        if name not in anonymous:
            yield f"offsetof({c_type}, {path})", offset
            if desc.size:  # a flexible array member has no sizeof in C
                yield f"sizeof((({c_type} *)0)->{path})", desc.size
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure | ctypes.Union):
            yield from _field_checks(ftype, c_type, path, offset)


def python_side() -> dict[str, int]:
    """Every value the C program prints, computed from the Python declarations."""
    values: dict[str, int] = {}
    for struct in abi.ALL_STRUCTS:
        values[f"sizeof({struct._c_name_})"] = ctypes.sizeof(struct)
        values.update(_field_checks(struct, struct._c_name_, "", 0))
    for ioctl in abi.Ioctl:
        values[ioctl.c_name] = int(ioctl)
    for enum_cls, prefix in C_PREFIXES.items():
        for member in enum_cls:
            values[f"{prefix}{member.name}"] = int(member)
    values.update(C_CONSTANTS)
    return values


def c_program(values: dict[str, int]) -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    for expr in values:
        lines.append(f'  printf("%s %lu\\n", "{expr}", (unsigned long)({expr}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_side(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("gcc") is None or not HEADER.exists():
        pytest.fail("gcc and linux-libc-dev are needed: apt-get install gcc linux-libc-dev")
    work = tmp_path_factory.mktemp("abi")
    src = work / "abi.c"
    src.write_text(c_program(python_side()))
    exe = work / "abi"
    subprocess.run(["gcc", "-O0", "-w", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    result: dict[str, int] = {}
    for line in out.splitlines():
        expr, _, value = line.rpartition(" ")
        result[expr] = int(value)
    return result


def test_every_layout_matches_the_kernel_header(c_side: dict[str, int]) -> None:
    expected = python_side()
    mismatches = {k: (v, c_side.get(k)) for k, v in expected.items() if c_side.get(k) != v}
    assert not mismatches, f"python != C: {mismatches}"


def test_all_named_structs_are_checked() -> None:
    def walk(cls: type) -> Iterator[type]:
        for sub in cls.__subclasses__():
            yield sub
            yield from walk(sub)

    named = {c for c in walk(KvmStruct) if c._c_name_ and c.__module__.startswith("vmce.kvm.abi")}
    named.discard(abi.run.RunDebugArch)  # checked through kvm_run.debug.arch
    assert named <= set(abi.ALL_STRUCTS)


def test_reference_numbers() -> None:
    # Spot checks against the numbers the feasibility probe printed with its own C program.
    assert abi.Ioctl.RUN == 0xAE80
    assert abi.Ioctl.SET_VCPU_EVENTS == 0x4040AEA0
    assert abi.Ioctl.X86_SET_MSR_FILTER == 0x4188AEC6
    assert abi.Ioctl.ENABLE_CAP == 0x4068AEA3
    assert abi.Ioctl.X86_SET_MCE == 0x4040AE9E
    assert ctypes.sizeof(abi.KvmRun) == 2352
    assert abi.KvmRun.msr.offset + abi.run.RunMsr.index.offset == 0x2C
    assert abi.KvmVcpuEvents.exception_payload.offset == 0x38


def test_flex_buffer_places_entries_after_the_header() -> None:
    buf = abi.FlexBuffer(abi.KvmMsrs, abi.KvmMsrEntry, "entries", 3)
    buf.header.nmsrs = 3
    buf.entries[2].index = 0x179
    raw = bytes(buf.buffer)
    assert len(raw) == 8 + 3 * 16
    assert int.from_bytes(raw[0:4], "little") == 3
    assert int.from_bytes(raw[8 + 32 : 8 + 36], "little") == 0x179
