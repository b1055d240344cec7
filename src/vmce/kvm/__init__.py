"""vmce.kvm: a small pure-Python VMM on Linux KVM (the layer the vMCE model plugs into).

Layout (after Firecracker's ``vmm`` crate): ``abi`` (the kernel ABI), ``system``/``vm``/
``vcpu``/``memory`` (one KVM object each), ``runner`` (a vCPU thread), ``x86`` (CPUID, page
tables, GDT, long-mode entry), ``devices`` (port-I/O bus, 16550A, debug-exit), ``pvm``
(kvm_pvm work-arounds), ``events`` (exception/triple-fault injection) and ``machine`` (the VMM).
"""

from vmce.kvm.boot import BspBoot, DirectBoot
from vmce.kvm.events import Injection
from vmce.kvm.machine import Machine, MachineConfig, MmioAccess, MsrHandler
from vmce.kvm.stop import StopKind, StopReason
from vmce.kvm.vm import MsrRange

__all__ = [
    "BspBoot",
    "DirectBoot",
    "Injection",
    "Machine",
    "MachineConfig",
    "MmioAccess",
    "MsrHandler",
    "MsrRange",
    "StopKind",
    "StopReason",
]
