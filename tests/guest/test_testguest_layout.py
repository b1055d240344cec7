"""The host's BootInfo declaration against the guest's C header, field by field."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

from vmce.guest.testguest import BootInfo, Probe, source_dir

FIELDS = [f.name for f in dataclasses.fields(BootInfo)]


def c_offsets(tmp: Path) -> dict[str, int]:
    prog = tmp / "off.c"
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "bootinfo.h"',
        "int main(void) {",
        '  printf("sizeof %zu\\n", sizeof(struct bootinfo));',
        '  printf("probe %zu\\n", sizeof(struct probe));',
    ]
    lines += [f'  printf("{n} %zu\\n", offsetof(struct bootinfo, {n}));' for n in FIELDS]
    lines += ["  return 0; }"]
    prog.write_text("\n".join(lines))
    exe = tmp / "off"
    subprocess.run(["gcc", "-I", str(source_dir()), "-o", str(exe), str(prog)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_bootinfo_matches_the_c_header(tmp_path: Path) -> None:
    c = c_offsets(tmp_path)
    assert c["sizeof"] == BootInfo.size()
    assert c["probe"] == Probe.size()
    offset = 0
    for f in dataclasses.fields(BootInfo):
        assert c[f.name] == offset, f.name
        offset += BootInfo.struct().__class__(BootInfo.BYTE_ORDER + f.metadata["fmt"]).size
