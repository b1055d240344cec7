"""64-bit long-mode entry: identity page tables, the boot GDT/TSS and the entry register state.

Selectors follow Linux (``__BOOT_CS`` 0x10, ``__BOOT_DS`` 0x18 in the 64-bit boot protocol, and
the SYSRET-compatible user selectors 0x23/0x2b/0x33), so stubs can enter CPL3 with
``iretq`` without building their own GDT.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import IntEnum, IntFlag

from vmce.kvm.abi import KvmFpu, KvmRegs, KvmSegment, KvmSregs
from vmce.kvm.memory import GuestMemory
from vmce.kvm.x86.layout import TWO_MIB, BootLayout


class Selector(IntEnum):
    """Boot GDT selectors (RPL included for the user ones)."""

    NULL = 0x00
    KERNEL_CS = 0x10
    KERNEL_DS = 0x18
    USER32_CS = 0x23
    USER_DS = 0x2B
    USER_CS = 0x33
    FIRST_TSS = 0x40


class DescFlags(IntEnum):
    """Descriptor flags in the ``0xF0FF`` form: G/DB/L/AVL nibble, then P/DPL/S/type."""

    KERNEL_CODE64 = 0xA09B
    KERNEL_DATA = 0xC093
    USER_CODE32 = 0xC0FB
    USER_DATA = 0xC0F3
    USER_CODE64 = 0xA0FB
    TSS64_AVAILABLE = 0x0089
    TSS64_BUSY = 0x008B


class Cr0(IntFlag):
    """CR0 bits used here."""

    PE = 1 << 0
    MP = 1 << 1
    ET = 1 << 4
    NE = 1 << 5
    WP = 1 << 16
    PG = 1 << 31


class Cr4(IntFlag):
    """CR4 bits used here."""

    PAE = 1 << 5
    MCE = 1 << 6
    OSFXSR = 1 << 9
    OSXMMEXCPT = 1 << 10


class Efer(IntFlag):
    """IA32_EFER bits used here."""

    SCE = 1 << 0
    LME = 1 << 8
    LMA = 1 << 10
    NXE = 1 << 11


class Pte(IntFlag):
    """Page-table entry bits used here."""

    PRESENT = 1 << 0
    WRITABLE = 1 << 1
    USER = 1 << 2
    HUGE = 1 << 7


ENTRY_CR0 = Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG
#: CR4.MCE is left clear, as after reset: enabling machine checks is the guest kernel's job.
ENTRY_CR4 = Cr4.PAE | Cr4.OSFXSR | Cr4.OSXMMEXCPT
ENTRY_EFER = Efer.LME | Efer.LMA
RFLAGS_RESERVED = 0x2
TSS_SIZE = 0x68
_TABLE = Pte.PRESENT | Pte.WRITABLE | Pte.USER


def descriptor(flags: int, base: int, limit: int) -> int:
    """An 8-byte code/data (or low half of a system) descriptor."""
    return (
        ((base & 0xFF000000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0xF0000) << 32)
        | ((base & 0xFFFFFF) << 16)
        | (limit & 0xFFFF)
    )


def tss_descriptor(base: int, *, busy: bool) -> tuple[int, int]:
    """The two 8-byte halves of a 64-bit TSS descriptor."""
    flags = DescFlags.TSS64_BUSY if busy else DescFlags.TSS64_AVAILABLE
    return descriptor(flags, base, TSS_SIZE - 1), base >> 32


def segment(desc: int, selector: int, base_high: int = 0) -> KvmSegment:
    """The ``kvm_segment`` (hidden descriptor cache) that loading ``selector`` would produce."""
    limit = (desc & 0xFFFF) | ((desc >> 32) & 0xF0000)
    granular = (desc >> 55) & 1
    seg = KvmSegment()
    seg.base = ((desc >> 16) & 0xFFFFFF) | ((desc >> 32) & 0xFF000000) | (base_high << 32)
    seg.limit = (limit << 12) | 0xFFF if granular else limit
    seg.selector = selector
    seg.type = (desc >> 40) & 0xF
    seg.s = (desc >> 44) & 1
    seg.dpl = (desc >> 45) & 3
    seg.present = (desc >> 47) & 1
    seg.avl = (desc >> 52) & 1
    seg.l = (desc >> 53) & 1
    seg.db = (desc >> 54) & 1
    seg.g = granular
    seg.unusable = 0 if seg.present else 1
    return seg


_FIXED: dict[Selector, int] = {
    Selector.KERNEL_CS: descriptor(DescFlags.KERNEL_CODE64, 0, 0xFFFFF),
    Selector.KERNEL_DS: descriptor(DescFlags.KERNEL_DATA, 0, 0xFFFFF),
    Selector.USER32_CS: descriptor(DescFlags.USER_CODE32, 0, 0xFFFFF),
    Selector.USER_DS: descriptor(DescFlags.USER_DATA, 0, 0xFFFFF),
    Selector.USER_CS: descriptor(DescFlags.USER_CODE64, 0, 0xFFFFF),
}


def tss_selector(vcpu_index: int) -> int:
    """Selector of vCPU ``vcpu_index``'s TSS descriptor."""
    return Selector.FIRST_TSS + 16 * vcpu_index


def build_gdt(layout: BootLayout, nr_vcpus: int) -> bytes:
    """The boot GDT: fixed selectors, then a busy TSS descriptor per vCPU."""
    if nr_vcpus > layout.max_vcpus:
        raise ValueError(f"{nr_vcpus} vCPUs do not fit the boot layout ({layout.max_vcpus})")
    words = [0] * (Selector.FIRST_TSS // 8)
    for sel, desc in _FIXED.items():
        words[sel >> 3] = desc
    for i in range(nr_vcpus):
        words.extend(tss_descriptor(layout.tss(i), busy=True))
    return struct.pack(f"<{len(words)}Q", *words)


def build_tss(rsp0: int) -> bytes:
    """A 64-bit TSS with ``rsp0`` and no I/O permission bitmap."""
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<Q", tss, 4, rsp0)
    struct.pack_into("<H", tss, 0x66, TSS_SIZE)
    return bytes(tss)


def write_page_tables(mem: GuestMemory, layout: BootLayout) -> None:
    """Identity-map ``layout.identity_map_bytes`` with 2 MiB pages, user-accessible."""
    mem.write_u64(layout.pml4, layout.pdpt | _TABLE)
    for i in range(layout.page_directory_count):
        pd = layout.page_directories + i * 0x1000
        mem.write_u64(layout.pdpt + 8 * i, pd | _TABLE)
        base = i * 512
        entries = [((base + j) * TWO_MIB) | _TABLE | Pte.HUGE for j in range(512)]
        mem.write(pd, struct.pack("<512Q", *entries))


def write_boot_tables(mem: GuestMemory, layout: BootLayout, rsp0s: Sequence[int]) -> None:
    """Page tables, GDT, and one TSS per vCPU (``rsp0s[i]`` becomes vCPU i's RSP0)."""
    write_page_tables(mem, layout)
    mem.write(layout.gdt, build_gdt(layout, len(rsp0s)))
    for i, rsp0 in enumerate(rsp0s):
        mem.write(layout.tss(i), build_tss(rsp0))


def long_mode_sregs(sregs: KvmSregs, layout: BootLayout, vcpu_index: int, nr_vcpus: int) -> None:
    """Edit ``sregs`` (from KVM_GET_SREGS) for 64-bit entry with the boot GDT, no IDT."""
    code = segment(_FIXED[Selector.KERNEL_CS], Selector.KERNEL_CS)
    data = segment(_FIXED[Selector.KERNEL_DS], Selector.KERNEL_DS)
    low, high = tss_descriptor(layout.tss(vcpu_index), busy=True)
    sregs.cs = code
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, data.copy())
    sregs.tr = segment(low, tss_selector(vcpu_index), high)
    sregs.gdt.base = layout.gdt
    sregs.gdt.limit = Selector.FIRST_TSS + 16 * nr_vcpus - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = ENTRY_CR0
    sregs.cr3 = layout.pml4
    sregs.cr4 = ENTRY_CR4
    sregs.efer = ENTRY_EFER


def entry_regs(rip: int, rsp: int, rdi: int = 0, rsi: int = 0) -> KvmRegs:
    """General registers for entry at ``rip`` (interrupts off)."""
    regs = KvmRegs()
    regs.rip, regs.rsp, regs.rbp = rip, rsp, rsp
    regs.rdi, regs.rsi = rdi, rsi
    regs.rflags = RFLAGS_RESERVED
    return regs


def initial_fpu() -> KvmFpu:
    """x87/SSE reset values (FCW 0x37f, MXCSR 0x1f80)."""
    fpu = KvmFpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    return fpu
