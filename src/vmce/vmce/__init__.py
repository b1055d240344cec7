"""The vMCE model: Xen's virtual MCA, per vCPU, in pure Python (no KVM import).

Typical use::

    dom = Domain(HostProfile.intel(), nr_vcpus=4)
    dom.rdmsr(0, 0x179)                       # 0x1000c02
    dom.deliver(BankRecord(0xbd000000000000c0, addr=0x6000000, misc=0x86), gstatus=0x5)
"""

from vmce.vmce.domain import (
    BROADCAST,
    DOMID_INVALID,
    BankRecord,
    Crash,
    Delivery,
    Domain,
    FillResult,
    InjectionPolicy,
    InjectResult,
    RestoreError,
    VmceSave,
)
from vmce.vmce.msrs import MsrAccess, MsrTable, Outcome, vmce_rdmsr, vmce_wrmsr
from vmce.vmce.profile import GUEST_MC_BANK_NUM, HostProfile, Vendor
from vmce.vmce.state import Bank, VCpu, VCpuSnapshot

__all__ = [
    "BROADCAST",
    "DOMID_INVALID",
    "GUEST_MC_BANK_NUM",
    "Bank",
    "BankRecord",
    "Crash",
    "Delivery",
    "Domain",
    "FillResult",
    "HostProfile",
    "InjectResult",
    "InjectionPolicy",
    "MsrAccess",
    "MsrTable",
    "Outcome",
    "RestoreError",
    "VCpu",
    "VCpuSnapshot",
    "Vendor",
    "VmceSave",
    "vmce_rdmsr",
    "vmce_wrmsr",
]
