"""A KVM vCPU fd: its mmap'd ``kvm_run`` and the state get/set ioctls.

Threading rule: once a vCPU thread runs (:mod:`vmce.kvm.runner`), call these only from that
thread (submit a request). Set-up before the thread starts may happen on any thread.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from collections.abc import Iterable, Mapping, Sequence

from vmce.kvm.abi import (
    FlexBuffer,
    Ioctl,
    KvmCpuid2,
    KvmCpuidEntry2,
    KvmDebugregs,
    KvmFpu,
    KvmLapicState,
    KvmMpState,
    KvmMsrEntry,
    KvmMsrs,
    KvmRegs,
    KvmRun,
    KvmSregs,
    KvmVcpuEvents,
    KvmXcrs,
    KvmXsave,
    MpState,
)
from vmce.kvm.fdio import KvmError, ioctl, ioctl_buf
from vmce.kvm.vm import Vm
from vmce.kvm.x86.cpuid import CpuidEntry

_KVM_RUN = int(Ioctl.RUN)


class Vcpu:
    """One vCPU: ``vcpu_id`` is the KVM id, which is also the APIC ID."""

    def __init__(self, vm: Vm, vcpu_id: int) -> None:
        self.vcpu_id = vcpu_id
        self._fd = vm.create_vcpu_fd(vcpu_id)
        try:
            size = vm.kvm.vcpu_mmap_size()
            self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise
        # A temporary export gives the address; the view itself does not pin the mapping, so
        # close() can unmap it (the view must not be used after that).
        anchor = ctypes.c_char.from_buffer(self._map)
        self._run: KvmRun | None = KvmRun.from_address(ctypes.addressof(anchor))
        del anchor

    @property
    def fd(self) -> int:
        """The raw vCPU fd."""
        if self._fd < 0:
            raise ValueError(f"vCPU {self.vcpu_id} is closed")
        return self._fd

    @property
    def run(self) -> KvmRun:
        """The shared ``kvm_run`` page."""
        if self._run is None:
            raise ValueError(f"vCPU {self.vcpu_id} is closed")
        return self._run

    def enter(self) -> int:
        """One ``KVM_RUN``; returns the raw exit reason.

        Raises ``InterruptedError`` (EINTR: a kick or ``immediate_exit``) and
        ``BlockingIOError`` (EAGAIN: an AP woken by INIT/SIPI) for the caller to handle.
        """
        fcntl.ioctl(self._fd, _KVM_RUN, 0)
        return int(self.run.exit_reason)

    def io_data(self, length: int) -> bytes:
        """The ``length`` data bytes of the current KVM_EXIT_IO."""
        off = int(self.run.io.data_offset)
        return self._map[off : off + length]

    def set_io_data(self, data: bytes) -> None:
        """Answer the current KVM_EXIT_IO (an IN) with ``data``."""
        off = int(self.run.io.data_offset)
        self._map[off : off + len(data)] = data

    def get_tsc_khz(self) -> int:
        """The guest TSC frequency in kHz (KVM_GET_TSC_KHZ)."""
        return ioctl(self.fd, Ioctl.GET_TSC_KHZ)

    def get_regs(self) -> KvmRegs:
        """General registers."""
        regs = KvmRegs()
        ioctl_buf(self.fd, Ioctl.GET_REGS, regs)
        return regs

    def set_regs(self, regs: KvmRegs) -> None:
        """Set the general registers."""
        ioctl_buf(self.fd, Ioctl.SET_REGS, regs)

    def get_sregs(self) -> KvmSregs:
        """Segment and control registers."""
        sregs = KvmSregs()
        ioctl_buf(self.fd, Ioctl.GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: KvmSregs) -> None:
        """Set segment and control registers."""
        ioctl_buf(self.fd, Ioctl.SET_SREGS, sregs)

    def get_events(self) -> KvmVcpuEvents:
        """Pending/injected exception, interrupt, NMI, SMI and triple-fault state."""
        events = KvmVcpuEvents()
        ioctl_buf(self.fd, Ioctl.GET_VCPU_EVENTS, events)
        return events

    def set_events(self, events: KvmVcpuEvents) -> None:
        """Set the event state (always GET, modify, SET)."""
        ioctl_buf(self.fd, Ioctl.SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> MpState:
        """Multiprocessing state (needs an in-kernel irqchip to mean much)."""
        state = KvmMpState()
        ioctl_buf(self.fd, Ioctl.GET_MP_STATE, state)
        return MpState(int(state.mp_state))

    def set_mp_state(self, value: MpState) -> None:
        """Set the multiprocessing state (e.g. RUNNABLE to wake a halted vCPU)."""
        state = KvmMpState()
        state.mp_state = value
        ioctl_buf(self.fd, Ioctl.SET_MP_STATE, state)

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        """Host-side MSR reads (not filtered); MSRs KVM does not know are left out."""
        buf = FlexBuffer(KvmMsrs, KvmMsrEntry, "entries", len(indices))
        buf.header.nmsrs = len(indices)
        for entry, index in zip(buf.entries, indices, strict=True):
            entry.index = index
        done = ioctl_buf(self.fd, Ioctl.GET_MSRS, buf.buffer)
        return {int(e.index): int(e.data) for e in list(buf.entries)[:done]}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """Host-side MSR writes; raises if KVM refuses any of them."""
        buf = FlexBuffer(KvmMsrs, KvmMsrEntry, "entries", len(values))
        buf.header.nmsrs = len(values)
        for entry, (index, value) in zip(buf.entries, values.items(), strict=True):
            entry.index, entry.data = index, value
        done = ioctl_buf(self.fd, Ioctl.SET_MSRS, buf.buffer)
        if done != len(values):
            bad = list(values)[done]
            raise KvmError(22, f"KVM_SET_MSRS refused MSR {bad:#x} (vCPU {self.vcpu_id})")

    def set_cpuid(self, entries: Iterable[CpuidEntry]) -> None:
        """``KVM_SET_CPUID2`` (before the first KVM_RUN)."""
        items = list(entries)
        buf = FlexBuffer(KvmCpuid2, KvmCpuidEntry2, "entries", len(items))
        buf.header.nent = len(items)
        for raw, item in zip(buf.entries, items, strict=True):
            item.to_kvm(raw)
        ioctl_buf(self.fd, Ioctl.SET_CPUID2, buf.buffer)

    def get_cpuid(self, max_entries: int = 256) -> list[CpuidEntry]:
        """``KVM_GET_CPUID2``: the table set with :meth:`set_cpuid`."""
        buf = FlexBuffer(KvmCpuid2, KvmCpuidEntry2, "entries", max_entries)
        buf.header.nent = max_entries
        ioctl_buf(self.fd, Ioctl.GET_CPUID2, buf.buffer)
        return [CpuidEntry.from_kvm(buf.entries[i]) for i in range(int(buf.header.nent))]

    def get_lapic(self) -> KvmLapicState:
        """The in-kernel local APIC's register page."""
        state = KvmLapicState()
        ioctl_buf(self.fd, Ioctl.GET_LAPIC, state)
        return state

    def set_lapic(self, state: KvmLapicState) -> None:
        """Restore the local APIC's register page."""
        ioctl_buf(self.fd, Ioctl.SET_LAPIC, state)

    def get_fpu(self) -> KvmFpu:
        """x87/SSE state."""
        state = KvmFpu()
        ioctl_buf(self.fd, Ioctl.GET_FPU, state)
        return state

    def set_fpu(self, state: KvmFpu) -> None:
        """Set x87/SSE state."""
        ioctl_buf(self.fd, Ioctl.SET_FPU, state)

    def get_xsave(self) -> KvmXsave:
        """The legacy 4 KiB XSAVE area."""
        state = KvmXsave()
        ioctl_buf(self.fd, Ioctl.GET_XSAVE, state)
        return state

    def set_xsave(self, state: KvmXsave) -> None:
        """Restore the XSAVE area."""
        ioctl_buf(self.fd, Ioctl.SET_XSAVE, state)

    def get_xcrs(self) -> KvmXcrs:
        """Extended control registers."""
        state = KvmXcrs()
        ioctl_buf(self.fd, Ioctl.GET_XCRS, state)
        return state

    def set_xcrs(self, state: KvmXcrs) -> None:
        """Restore extended control registers."""
        ioctl_buf(self.fd, Ioctl.SET_XCRS, state)

    def get_debugregs(self) -> KvmDebugregs:
        """DR0-3, DR6, DR7."""
        state = KvmDebugregs()
        ioctl_buf(self.fd, Ioctl.GET_DEBUGREGS, state)
        return state

    def set_debugregs(self, state: KvmDebugregs) -> None:
        """Restore the debug registers."""
        ioctl_buf(self.fd, Ioctl.SET_DEBUGREGS, state)

    def nmi(self) -> None:
        """``KVM_NMI`` (in-kernel LAPIC only)."""
        ioctl(self.fd, Ioctl.NMI)

    def close(self) -> None:
        """Unmap kvm_run and close the fd (idempotent)."""
        self._run = None
        if not self._map.closed:
            self._map.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
