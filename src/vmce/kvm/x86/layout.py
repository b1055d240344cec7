"""Where the VMM puts its boot structures in guest-physical memory (direct and bsp boot).

Everything lives below :attr:`BootLayout.reserved_end` (64 KiB); guest images, boot info and
stacks chosen by the caller must start at or above it.

======================  =========================================================
``0x1000``              GDT: fixed selectors, then one 16-byte TSS descriptor per vCPU
``0x2000 + 0x80 * i``   64-bit TSS of vCPU ``i`` (RSP0 = the vCPU's initial stack)
``0x6000``              PML4, then PDPT at ``0x7000``, 4 page directories at ``0x8000``
======================  =========================================================
"""

from __future__ import annotations

from dataclasses import dataclass

FOUR_GIB = 4 << 30
TWO_MIB = 2 << 20


@dataclass(frozen=True)
class BootLayout:
    """Guest-physical addresses of the VMM-built boot structures."""

    gdt: int = 0x1000
    gdt_size: int = 0x1000
    tss_base: int = 0x2000
    tss_stride: int = 0x80
    tss_area_end: int = 0x6000
    pml4: int = 0x6000
    pdpt: int = 0x7000
    page_directories: int = 0x8000
    identity_map_bytes: int = FOUR_GIB
    reserved_end: int = 0x10000

    @property
    def max_vcpus(self) -> int:
        """How many per-vCPU TSSes (and GDT descriptors) fit."""
        by_tss = (self.tss_area_end - self.tss_base) // self.tss_stride
        by_gdt = (self.gdt_size - 0x40) // 16
        return min(by_tss, by_gdt)

    def tss(self, vcpu_index: int) -> int:
        """GPA of vCPU ``vcpu_index``'s TSS."""
        if not 0 <= vcpu_index < self.max_vcpus:
            raise ValueError(f"vCPU index {vcpu_index} outside 0..{self.max_vcpus - 1}")
        return self.tss_base + vcpu_index * self.tss_stride

    @property
    def page_directory_count(self) -> int:
        """Page directories (1 GiB each) needed for the identity map."""
        return self.identity_map_bytes // (1 << 30)


DEFAULT_LAYOUT = BootLayout()
