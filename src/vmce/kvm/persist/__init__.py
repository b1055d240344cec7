"""Whole-VM save, restore and snapshots for the KVM VMM, in Xen's libxc migration stream.

Typical use::

    report = save_vm(vm, "guest.xen")            # pause, capture, write, resume
    vm2 = restore_vm("guest.xen")                # a new VM, not started
    vm2.start()                                  # the guest goes on where it was

    snap = Snapshot.take(vm, "booted.xen")       # for tests: boot once...
    vm3 = snap.restore()                         # ...restore many times, RAM copy-on-write

The file is a libxc stream v3 for an x86 HVM domain that Xen's own verifier
(``tools/python/scripts/verify-stream-v2``) accepts: X86_CPUID_POLICY, X86_MSR_POLICY,
STATIC_DATA_END, PAGE_DATA (BROKEN for pages a host memory error took), X86_TSC_INFO,
HVM_PARAMS, HVM_CONTEXT, END. The HVM_CONTEXT blob holds Xen's own save records wherever Xen
has one (CPU, LAPIC, LAPIC_REGS, PIC, IOAPIC, PIT, MTRR, CPU_XSAVE, VMCE_VCPU byte-exact,
TSC_ADJUST, CPU_MSR); :mod:`vmce.kvm.persist.image` has the full table.

Where KVM-only state goes, and why
----------------------------------

State Xen has no record for (KVM's full event state, MP state, kvmclock, the MSRs outside
Xen's lists, KVM's extra PIC/IOAPIC/PIT fields, the UART, the machine's size and devices) and
the in-flight vMCE go in vmce's **vendor trailer inside the HVM_CONTEXT record, after the
blob's END descriptor** (:mod:`vmce.save.hvmrecords` frames it, :mod:`vmce.kvm.persist.vendor`
defines the KVM entries). Xen's verifier checks only that HVM_CONTEXT is non-empty, and Xen's
``hvm_load`` stops at the first END, so Xen accepts and ignores it; every other place was
ruled out (an optional stream record is rejected by the verifier, a second HVM_CONTEXT
replaces the first, a vendor HVM param or a typecode before END makes Xen's restore fail).

Page layout
-----------

PAGE_DATA batch sizes are chosen so that the pages of (nearly) every record start on a
4 KiB boundary of the file (:mod:`vmce.kvm.persist.pages`): a snapshot restore then maps guest
RAM ``MAP_PRIVATE`` straight from the file instead of copying it, and the stream is still an
ordinary one.
"""

from vmce.kvm.persist.image import VmImage, decode_image, encode_image
from vmce.kvm.persist.index import StreamIndex, index_path, index_stream
from vmce.kvm.persist.report import StreamReport, describe
from vmce.kvm.persist.restore import (
    BuildReport,
    RestoreFailed,
    RestoreReport,
    plan_restore,
    restore_vm,
    restore_vm_report,
)
from vmce.kvm.persist.save import SaveError, SaveReport, save_vm
from vmce.kvm.persist.snapshot import Snapshot

__all__ = [
    "BuildReport",
    "RestoreFailed",
    "RestoreReport",
    "SaveError",
    "SaveReport",
    "Snapshot",
    "StreamIndex",
    "StreamReport",
    "VmImage",
    "decode_image",
    "describe",
    "encode_image",
    "index_path",
    "index_stream",
    "plan_restore",
    "restore_vm",
    "restore_vm_report",
    "save_vm",
]
