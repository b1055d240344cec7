"""Synthetic whole-VM streams for tests that need no KVM: a plausible captured machine, written
with the real saver's record and page layout, and helpers to take streams apart and rebuild
them (for the bad-input suite, the cross-version matrix and the fuzz test)."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vmce.host.memory import GuestDomain, HostMemory, P2mType
from vmce.kvm.abi import (
    KvmClockData,
    KvmDebugregs,
    KvmIoapicState,
    KvmPicState,
    KvmPitState2,
    KvmRegs,
    KvmSregs,
    KvmVcpuEvents,
    KvmXcrs,
    KvmXsave,
    MpState,
)
from vmce.kvm.boot import DirectBoot
from vmce.kvm.devices.serial import SerialState
from vmce.kvm.persist.cpumap import XsaveLayout
from vmce.kvm.persist.image import encode_image
from vmce.kvm.persist.save import write_image_stream
from vmce.kvm.vmcevm import VmceVmConfig
from vmce.kvm.vstate import MachineState, PlatformState, VcpuState
from vmce.kvm.x86 import longmode
from vmce.kvm.x86.cpuid import INTEL_BROADWELL, CpuidEntry, CpuProfile
from vmce.kvm.x86.layout import DEFAULT_LAYOUT
from vmce.save.stream import RecordHeader, RecordType, StreamReader
from vmce.save.stream.format import padded
from vmce.vmce import Domain, HostProfile
from vmce.vmce import Vendor as ModelVendor

HEADERS = 40


def cpuid_table(cpu: CpuProfile) -> list[CpuidEntry]:
    ebx, edx, ecx = cpu.vendor.cpuid_registers()
    return [
        CpuidEntry(0, 0, 0, 0xD, ebx, ecx, edx),
        CpuidEntry(1, 0, 0, cpu.signature(), 0x800, 0x80000000, 0x178BFBFF),
        CpuidEntry(7, 0, 1, 0, 0, 0, 0),
    ]


def vcpu_state(i: int, n: int, *, irqchip: bool, halted: bool = False) -> VcpuState:
    sregs = KvmSregs()
    longmode.long_mode_sregs(sregs, DEFAULT_LAYOUT, i, n)
    sregs.fs.unusable = 1
    sregs.apic_base = 0xFEE00900 if i == 0 else 0xFEE00800
    regs = KvmRegs()
    regs.rip, regs.rsp, regs.rflags, regs.rax = 0x100000 + 0x40 * i, 0x80000, 0x202, 7 + i
    xsave = KvmXsave()
    xsave.region[0] = 0x37F  # FCW
    xsave.region[6] = 0x1F80  # MXCSR
    xsave.region[128] = 0x3  # XSTATE_BV: x87 | SSE
    xcrs = KvmXcrs()
    xcrs.nr_xcrs = 1
    xcrs.xcrs[0].value = 1
    events = KvmVcpuEvents()
    events.flags = 0x3D
    debug = KvmDebugregs()
    debug.dr6, debug.dr7 = 0xFFFF0FF0, 0x400
    lapic = None
    if irqchip:
        from vmce.kvm.abi import KvmLapicState

        page = bytearray(1024)
        page[0x20:0x24] = struct.pack("<I", i << 24)
        page[0xF0:0xF4] = struct.pack("<I", 0x1FF)
        lapic = KvmLapicState.from_bytes(bytes(page))
    msrs = {
        0x10: 0x1000_0000 + i,
        0x174: 0x10,
        0xC0000082: 0xFFFF_8000_0000_1000,
        0xC0000102: 0x1234_0000 + i,
        0x277: 0x0007040600070406,
        0xFE: 0x508,
        0x2FF: 0xC06,
        0x3B: 0,
        0xCE: 0x80000000,
        0x10A: 0,
        0x140: 1,
        0x1A0: 1,
        0x4B564D05: 1,
        0x6E0: 0,
    }
    return VcpuState(
        vcpu_id=i,
        regs=regs,
        sregs=sregs,
        xsave=xsave,
        xcrs=xcrs,
        debugregs=debug,
        events=events,
        mp_state=MpState.RUNNABLE,
        msrs=msrs,
        lapic=lapic,
        halted=halted,
        tsc_khz=2_000_000,
    )


def platform_state(*, irqchip: bool, pit: bool) -> PlatformState:
    clock = KvmClockData()
    clock.clock = 123_456_789
    state = PlatformState(clock=clock)
    if irqchip:
        m, s = KvmPicState(), KvmPicState()
        m.imr, m.irq_base, m.elcr_mask, m.irr, m.last_irr = 0xFA, 0x20, 0xF8, 0x10, 0x10
        s.imr, s.irq_base, s.elcr_mask = 0xFF, 0x28, 0xDE
        io = KvmIoapicState()
        io.base_address, io.id = 0xFEC00000, 0
        for pin in range(24):
            io.redirtbl[pin] = 1 << 16 if pin != 4 else 0x34
        state.pic_master, state.pic_slave, state.ioapic = m, s, io
        if pit:
            p = KvmPitState2()
            for ch in p.channels:
                ch.count, ch.mode, ch.rw_mode, ch.gate = 0x10000, 2, 3, 1
            p.channels[0].count_load_time = 1_000_000
            state.pit = p
    return state


@dataclass
class Synth:
    """A synthetic VM: how it was built, its model, its state and RAM."""

    config: VmceVmConfig
    domain: Domain
    host_memory: HostMemory
    state: MachineState
    ram: bytearray
    cpuid: list[CpuidEntry] = field(default_factory=list)

    def write(self, path: Path, *, vmce_size: int = 32) -> bytes:
        parts = encode_image(
            self.config,
            self.domain,
            self.host_memory,
            self.state,
            cpuid=self.cpuid,
            xsave_layout=XsaveLayout(),
            vmce_size=vmce_size,
        )
        buf = io.BytesIO()
        write_image_stream(buf, parts, memoryview(self.ram))
        data = buf.getvalue()
        path.write_bytes(data)
        return data


def make_synth(
    *,
    vcpus: int = 2,
    pages: int = 16,
    profile: HostProfile | None = None,
    cpu: CpuProfile = INTEL_BROADWELL,
    irqchip: bool = False,
    pit: bool = False,
    broken: tuple[int, ...] = (),
) -> Synth:
    profile = profile or HostProfile.intel()
    memory = pages * 4096
    config = VmceVmConfig(
        boot=DirectBoot(0, 0, [0] * vcpus),
        vcpus=vcpus,
        memory_size=memory,
        profile=profile,
        cpu=cpu,
        irqchip=irqchip,
        pit=pit,
    )
    domain = Domain(profile, vcpus, domid=1, guest_vendor=ModelVendor.parse(cpu.vendor.value))
    hm = HostMemory()
    hm.add_ram(config.host_mfn_base, pages)
    hm.add_domain(GuestDomain(domain))
    hm.assign(1, 0, config.host_mfn_base, pages)
    for gfn in broken:
        hm.domains[1].p2m[gfn].type = P2mType.RAM_BROKEN
    state = MachineState(
        [vcpu_state(i, vcpus, irqchip=irqchip, halted=i == 1) for i in range(vcpus)],
        platform_state(irqchip=irqchip, pit=pit),
        SerialState(ier=2, lcr=3, fifo=True, thri_pending=True, rx=b"ab", pending=b"half a li"),
    )
    ram = bytearray(memory)
    for p in range(pages):
        ram[p * 4096 : p * 4096 + 8] = struct.pack("<Q", 0xC0DE0000 + p)
    return Synth(config, domain, hm, state, ram, cpuid_table(cpu))


# -- taking streams apart ---------------------------------------------------------------------


@dataclass
class Rec:
    """One record of a stream: type and unpadded body."""

    type: int
    body: bytes

    def pack(self, length: int | None = None, pad: bytes | None = None) -> bytes:
        n = len(self.body) if length is None else length
        padding = bytes(padded(len(self.body)) - len(self.body)) if pad is None else pad
        return RecordHeader(self.type, n).pack() + self.body + padding


def split(data: bytes) -> tuple[bytes, list[Rec]]:
    """The two headers and the records of a valid stream."""
    reader = StreamReader(io.BytesIO(data))
    reader.read_headers()
    return data[:HEADERS], [Rec(r.type, bytes(r.body)) for r in reader.records()]


def join(head: bytes, recs: list[Rec]) -> bytes:
    return head + b"".join(r.pack() for r in recs)


def find(recs: list[Rec], rtype: RecordType) -> int:
    return next(i for i, r in enumerate(recs) if r.type == rtype)


def edit_context(data: bytes, fn: Callable[[bytes], bytes]) -> bytes:
    """The stream with its HVM_CONTEXT body replaced by ``fn(body)``."""
    head, recs = split(data)
    i = find(recs, RecordType.HVM_CONTEXT)
    recs[i] = Rec(recs[i].type, fn(recs[i].body))
    return join(head, recs)
