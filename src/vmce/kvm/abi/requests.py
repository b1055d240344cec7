"""KVM ioctl request numbers, derived from the ``_IO*`` encoding and the ctypes sizes.

Names are the C macro names without the ``KVM_`` prefix (``Ioctl.RUN`` is ``KVM_RUN``).
Where the header's direction looks odd (``KVM_SET_IRQCHIP`` is ``_IOR``), it is copied as is:
the number is what matters.
"""

from __future__ import annotations

from ctypes import c_uint64
from enum import IntEnum, unique

from vmce.kvm.abi import cpu, vmstate
from vmce.kvm.abi.ioc import KVMIO, io, ior, iow, iowr


@unique
class Ioctl(IntEnum):
    """Every KVM request this VMM issues, on /dev/kvm, a VM fd or a vCPU fd."""

    # /dev/kvm
    GET_API_VERSION = io(KVMIO, 0x00)
    CREATE_VM = io(KVMIO, 0x01)
    GET_MSR_INDEX_LIST = iowr(KVMIO, 0x02, cpu.KvmMsrList)
    CHECK_EXTENSION = io(KVMIO, 0x03)
    GET_VCPU_MMAP_SIZE = io(KVMIO, 0x04)
    GET_SUPPORTED_CPUID = iowr(KVMIO, 0x05, cpu.KvmCpuid2)
    GET_MSR_FEATURE_INDEX_LIST = iowr(KVMIO, 0x0A, cpu.KvmMsrList)
    X86_GET_MCE_CAP_SUPPORTED = ior(KVMIO, 0x9D, c_uint64)
    # VM fd
    CREATE_VCPU = io(KVMIO, 0x41)
    SET_USER_MEMORY_REGION = iow(KVMIO, 0x46, vmstate.KvmUserspaceMemoryRegion)
    SET_TSS_ADDR = io(KVMIO, 0x47)
    SET_IDENTITY_MAP_ADDR = iow(KVMIO, 0x48, c_uint64)
    CREATE_IRQCHIP = io(KVMIO, 0x60)
    IRQ_LINE = iow(KVMIO, 0x61, vmstate.KvmIrqLevel)
    GET_IRQCHIP = iowr(KVMIO, 0x62, vmstate.KvmIrqchip)
    SET_IRQCHIP = ior(KVMIO, 0x63, vmstate.KvmIrqchip)
    CREATE_PIT2 = iow(KVMIO, 0x77, vmstate.KvmPitConfig)
    SET_CLOCK = iow(KVMIO, 0x7B, vmstate.KvmClockData)
    GET_CLOCK = ior(KVMIO, 0x7C, vmstate.KvmClockData)
    GET_PIT2 = ior(KVMIO, 0x9F, vmstate.KvmPitState2)
    SET_PIT2 = iow(KVMIO, 0xA0, vmstate.KvmPitState2)
    SET_TSC_KHZ = io(KVMIO, 0xA2)
    GET_TSC_KHZ = io(KVMIO, 0xA3)
    ENABLE_CAP = iow(KVMIO, 0xA3, vmstate.KvmEnableCap)
    X86_SET_MSR_FILTER = iow(KVMIO, 0xC6, vmstate.KvmMsrFilter)
    # vCPU fd
    RUN = io(KVMIO, 0x80)
    GET_REGS = ior(KVMIO, 0x81, cpu.KvmRegs)
    SET_REGS = iow(KVMIO, 0x82, cpu.KvmRegs)
    GET_SREGS = ior(KVMIO, 0x83, cpu.KvmSregs)
    SET_SREGS = iow(KVMIO, 0x84, cpu.KvmSregs)
    GET_MSRS = iowr(KVMIO, 0x88, cpu.KvmMsrs)
    SET_MSRS = iow(KVMIO, 0x89, cpu.KvmMsrs)
    GET_FPU = ior(KVMIO, 0x8C, cpu.KvmFpu)
    SET_FPU = iow(KVMIO, 0x8D, cpu.KvmFpu)
    GET_LAPIC = ior(KVMIO, 0x8E, cpu.KvmLapicState)
    SET_LAPIC = iow(KVMIO, 0x8F, cpu.KvmLapicState)
    SET_CPUID2 = iow(KVMIO, 0x90, cpu.KvmCpuid2)
    GET_CPUID2 = iowr(KVMIO, 0x91, cpu.KvmCpuid2)
    GET_MP_STATE = ior(KVMIO, 0x98, cpu.KvmMpState)
    SET_MP_STATE = iow(KVMIO, 0x99, cpu.KvmMpState)
    NMI = io(KVMIO, 0x9A)
    X86_SETUP_MCE = iow(KVMIO, 0x9C, c_uint64)
    X86_SET_MCE = iow(KVMIO, 0x9E, cpu.KvmX86Mce)
    GET_VCPU_EVENTS = ior(KVMIO, 0x9F, cpu.KvmVcpuEvents)
    SET_VCPU_EVENTS = iow(KVMIO, 0xA0, cpu.KvmVcpuEvents)
    GET_DEBUGREGS = ior(KVMIO, 0xA1, cpu.KvmDebugregs)
    SET_DEBUGREGS = iow(KVMIO, 0xA2, cpu.KvmDebugregs)
    GET_XSAVE = ior(KVMIO, 0xA4, cpu.KvmXsave)
    SET_XSAVE = iow(KVMIO, 0xA5, cpu.KvmXsave)
    GET_XCRS = ior(KVMIO, 0xA6, cpu.KvmXcrs)
    SET_XCRS = iow(KVMIO, 0xA7, cpu.KvmXcrs)
    GET_XSAVE2 = ior(KVMIO, 0xCF, cpu.KvmXsave)

    @property
    def c_name(self) -> str:
        """The C macro name, e.g. ``KVM_RUN``."""
        return f"KVM_{self.name}"
