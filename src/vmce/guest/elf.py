"""A minimal ELF64 reader: the loadable segments and the symbol table of a static executable."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from vmce.save.layout import Layout, raw, u16, u32, u64

PT_LOAD = 1
SHT_SYMTAB = 2
ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class ElfHeader(Layout):
    ident: bytes = raw(16)
    type: int = u16()
    machine: int = u16()
    version: int = u32()
    entry: int = u64()
    phoff: int = u64()
    shoff: int = u64()
    flags: int = u32()
    ehsize: int = u16()
    phentsize: int = u16()
    phnum: int = u16()
    shentsize: int = u16()
    shnum: int = u16()
    shstrndx: int = u16()


@dataclass(frozen=True)
class ProgramHeader(Layout):
    type: int = u32()
    flags: int = u32()
    offset: int = u64()
    vaddr: int = u64()
    paddr: int = u64()
    filesz: int = u64()
    memsz: int = u64()
    align: int = u64()


@dataclass(frozen=True)
class SectionHeader(Layout):
    name: int = u32()
    type: int = u32()
    flags: int = u64()
    addr: int = u64()
    offset: int = u64()
    sh_size: int = u64()
    link: int = u32()
    info: int = u32()
    addralign: int = u64()
    entsize: int = u64()


class ElfError(ValueError):
    """Not a loadable ELF64 x86-64 executable; the message says why."""


@dataclass(frozen=True)
class Segment:
    """A PT_LOAD segment: bytes to place at ``paddr``, then zeros up to ``memsz``."""

    paddr: int
    data: bytes
    memsz: int


@dataclass
class ElfImage:
    entry: int
    segments: list[Segment]
    symbols: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, blob: bytes, name: str = "<elf>") -> ElfImage:
        if len(blob) < ElfHeader.size() or blob[:4] != ELF_MAGIC:
            raise ElfError(f"{name}: not an ELF file")
        h = ElfHeader.unpack_from(blob)
        if h.ident[4] != 2 or h.ident[5] != 1 or h.machine != 62:
            raise ElfError(f"{name}: not a little-endian ELF64 x86-64 file")
        segs = []
        for i in range(h.phnum):
            off = h.phoff + i * h.phentsize
            if off + ProgramHeader.size() > len(blob):
                raise ElfError(f"{name}: program header {i} is truncated")
            ph = ProgramHeader.unpack_from(blob, off)
            if ph.type != PT_LOAD:
                continue
            if ph.offset + ph.filesz > len(blob) or ph.filesz > ph.memsz:
                raise ElfError(f"{name}: segment {i} runs past the file")
            segs.append(Segment(ph.paddr, blob[ph.offset : ph.offset + ph.filesz], ph.memsz))
        if not segs:
            raise ElfError(f"{name}: no loadable segment")
        return cls(h.entry, segs, _symbols(blob, h))

    @classmethod
    def load(cls, path: Path) -> ElfImage:
        return cls.parse(path.read_bytes(), str(path))


#: Elf64_Sym: name u32, info u8, other u8, shndx u16, value u64, size u64.
_SYM = struct.Struct("<IBBHQQ")


def _symbols(blob: bytes, h: ElfHeader) -> dict[str, int]:
    out: dict[str, int] = {}
    sections = [
        SectionHeader.unpack_from(blob, h.shoff + i * h.shentsize)
        for i in range(h.shnum)
        if h.shoff + (i + 1) * h.shentsize <= len(blob)
    ]
    for sh in sections:
        if sh.type != SHT_SYMTAB or sh.link >= len(sections):
            continue
        strtab = sections[sh.link]
        strs = blob[strtab.offset : strtab.offset + strtab.sh_size]
        for off in range(sh.offset, sh.offset + sh.sh_size - _SYM.size + 1, _SYM.size):
            name_off, _info, _other, _shndx, value, _size = _SYM.unpack_from(blob, off)
            if name_off:
                end = strs.find(b"\0", name_off)
                out[strs[name_off:end].decode(errors="replace")] = value
    return out
