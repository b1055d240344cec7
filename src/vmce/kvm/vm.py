"""A KVM VM fd: memory slots, VM-wide capabilities, MSR filter, irqchip, PIT and clock."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass

from vmce.kvm.abi import (
    Cap,
    Ioctl,
    IrqchipId,
    KvmClockData,
    KvmEnableCap,
    KvmIrqchip,
    KvmIrqLevel,
    KvmMsrFilter,
    KvmPitConfig,
    KvmPitState2,
    KvmUserspaceMemoryRegion,
    MsrExitReason,
    MsrFilterAccess,
    MsrFilterDefault,
)
from vmce.kvm.abi.constants import KVM_MSR_FILTER_MAX_BITMAP_SIZE, KVM_MSR_FILTER_MAX_RANGES
from vmce.kvm.fdio import ioctl, ioctl_buf, ioctl_ulong
from vmce.kvm.memory import GuestMemory
from vmce.kvm.system import Kvm

#: Three pages below 4 GiB for the VMX real-mode TSS (as QEMU/Firecracker use).
DEFAULT_TSS_ADDR = 0xFFFBD000
KVM_PIT_SPEAKER_DUMMY = 1


@dataclass(frozen=True)
class MsrRange:
    """MSRs ``[base, base + count)`` whose guest reads and/or writes go to user space."""

    base: int
    count: int
    read: bool = True
    write: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.count <= KVM_MSR_FILTER_MAX_BITMAP_SIZE * 8:
            raise ValueError(f"MSR range count {self.count} outside 1..{0x600 * 8}")
        if not (self.read or self.write):
            raise ValueError("an MSR range must filter reads, writes or both")

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and self.base <= index < self.base + self.count

    @property
    def access(self) -> MsrFilterAccess:
        """The ``kvm_msr_filter_range.flags`` for this range."""
        flags = MsrFilterAccess(0)
        if self.read:
            flags |= MsrFilterAccess.READ
        if self.write:
            flags |= MsrFilterAccess.WRITE
        return flags


class Vm:
    """One KVM virtual machine (the VM fd)."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self._fd = ioctl(kvm.fd, Ioctl.CREATE_VM, 0)
        self._filter_bitmaps: list[ctypes.Array[ctypes.c_uint8]] = []
        self.has_irqchip = False
        self.triple_fault_event = False
        self.exception_payload = False

    @property
    def fd(self) -> int:
        """The raw VM fd (valid until :meth:`close`)."""
        if self._fd < 0:
            raise ValueError("Vm is closed")
        return self._fd

    def check_extension(self, cap: Cap) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd (the per-VM answer)."""
        return ioctl(self.fd, Ioctl.CHECK_EXTENSION, int(cap))

    def enable_cap(self, cap: Cap, *args: int) -> None:
        """``KVM_ENABLE_CAP`` on the VM with up to four arguments."""
        req = KvmEnableCap()
        req.cap = cap
        for i, arg in enumerate(args):
            req.args[i] = arg
        ioctl_buf(self.fd, Ioctl.ENABLE_CAP, req)

    def set_memory(self, memory: GuestMemory) -> None:
        """Register every region of ``memory`` as a KVM memory slot."""
        for region in memory.regions:
            slot = KvmUserspaceMemoryRegion()
            slot.slot = region.slot
            slot.guest_phys_addr = region.gpa
            slot.memory_size = region.size
            slot.userspace_addr = memory.host_address(region)
            ioctl_buf(self.fd, Ioctl.SET_USER_MEMORY_REGION, slot)

    def set_tss_addr(self, addr: int = DEFAULT_TSS_ADDR) -> None:
        """``KVM_SET_TSS_ADDR``: its argument does not fit a C int, hence the libc path."""
        ioctl_ulong(self.fd, Ioctl.SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR`` (VMX's real-mode identity page table)."""
        ioctl_buf(self.fd, Ioctl.SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and per-vCPU LAPICs. Call before creating vCPUs."""
        ioctl(self.fd, Ioctl.CREATE_IRQCHIP)
        self.has_irqchip = True

    def create_pit2(self) -> None:
        """In-kernel 8254 PIT (needs the irqchip)."""
        config = KvmPitConfig()
        config.flags = KVM_PIT_SPEAKER_DUMMY
        ioctl_buf(self.fd, Ioctl.CREATE_PIT2, config)

    def irq_line(self, irq: int, level: int) -> None:
        """``KVM_IRQ_LINE``: set GSI ``irq`` to ``level`` (needs the irqchip)."""
        req = KvmIrqLevel()
        req.irq = irq
        req.level = level
        ioctl_buf(self.fd, Ioctl.IRQ_LINE, req)

    def enable_user_space_msr(self, reasons: MsrExitReason = MsrExitReason.FILTER) -> None:
        """Send guest RDMSR/WRMSR that fail for ``reasons`` to user space (exits 29/30)."""
        self.enable_cap(Cap.X86_USER_SPACE_MSR, int(reasons))

    def set_msr_filter(
        self, deny: Sequence[MsrRange], default: MsrFilterDefault = MsrFilterDefault.ALLOW
    ) -> None:
        """Install an MSR filter in which the ``deny`` ranges are denied (bitmaps all zero).

        With :meth:`enable_user_space_msr` (FILTER), denied accesses exit to user space. An
        empty ``deny`` with ALLOW removes the filter. The bitmaps stay referenced here.
        """
        if len(deny) > KVM_MSR_FILTER_MAX_RANGES:
            raise ValueError(f"at most {KVM_MSR_FILTER_MAX_RANGES} MSR filter ranges")
        req = KvmMsrFilter()
        req.flags = default
        bitmaps: list[ctypes.Array[ctypes.c_uint8]] = []
        for slot, rng in zip(req.ranges, deny, strict=False):
            # KVM copies BITS_TO_LONGS(nmsrs) longs: round the bitmap up to 8 bytes.
            bitmap = (ctypes.c_uint8 * (((rng.count + 63) // 64) * 8))()
            bitmaps.append(bitmap)
            slot.flags = rng.access
            slot.nmsrs = rng.count
            slot.base = rng.base
            slot.bitmap = ctypes.addressof(bitmap)
        ioctl_buf(self.fd, Ioctl.X86_SET_MSR_FILTER, req)
        self._filter_bitmaps = bitmaps

    def enable_triple_fault_event(self) -> bool:
        """Enable ``KVM_CAP_X86_TRIPLE_FAULT_EVENT`` if the host has it; True when enabled."""
        if self.check_extension(Cap.X86_TRIPLE_FAULT_EVENT) <= 0:
            return False
        self.enable_cap(Cap.X86_TRIPLE_FAULT_EVENT, 1)
        self.triple_fault_event = True
        return True

    def enable_exception_payload(self) -> bool:
        """Enable ``KVM_CAP_EXCEPTION_PAYLOAD`` if the host has it; True when enabled."""
        if self.check_extension(Cap.EXCEPTION_PAYLOAD) <= 0:
            return False
        self.enable_cap(Cap.EXCEPTION_PAYLOAD, 1)
        self.exception_payload = True
        return True

    def get_irqchip(self, chip: IrqchipId) -> KvmIrqchip:
        """State of one in-kernel interrupt controller."""
        state = KvmIrqchip()
        state.chip_id = chip
        ioctl_buf(self.fd, Ioctl.GET_IRQCHIP, state)
        return state

    def set_irqchip(self, state: KvmIrqchip) -> None:
        """Restore one in-kernel interrupt controller."""
        ioctl_buf(self.fd, Ioctl.SET_IRQCHIP, state)

    def get_pit2(self) -> KvmPitState2:
        """State of the in-kernel PIT."""
        state = KvmPitState2()
        ioctl_buf(self.fd, Ioctl.GET_PIT2, state)
        return state

    def set_pit2(self, state: KvmPitState2) -> None:
        """Restore the in-kernel PIT."""
        ioctl_buf(self.fd, Ioctl.SET_PIT2, state)

    def get_clock(self) -> KvmClockData:
        """The VM's kvmclock."""
        state = KvmClockData()
        ioctl_buf(self.fd, Ioctl.GET_CLOCK, state)
        return state

    def set_clock(self, state: KvmClockData) -> None:
        """Set the VM's kvmclock."""
        ioctl_buf(self.fd, Ioctl.SET_CLOCK, state)

    def create_vcpu_fd(self, vcpu_id: int) -> int:
        """``KVM_CREATE_VCPU``; :class:`vmce.kvm.vcpu.Vcpu` wraps the fd."""
        return ioctl(self.fd, Ioctl.CREATE_VCPU, vcpu_id)

    def close(self) -> None:
        """Close the VM fd (idempotent); KVM frees the VM when its vCPU fds are closed too."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._filter_bitmaps = []
