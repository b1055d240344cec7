"""Restoring a VM from a stream file into a new :class:`~vmce.kvm.vmcevm.VmceVm`.

Three steps, and nothing reaches a VM before the first two have passed:

1. :func:`~vmce.kvm.persist.index.index_stream` checks every record of the file (framing, order,
   bodies) and finds where each page is;
2. :func:`~vmce.kvm.persist.image.decode_image` decodes and checks every value against what this
   VMM and the restoring host's vMCE profile accept (Xen's ``vmce_restore_vcpu`` rule);
3. a new VM is built, its RAM filled (copied, or mapped copy-on-write from the file for a
   snapshot), and its state applied before any vCPU runs. If KVM refuses anything, the new VM
   is closed: a failed restore leaves nothing behind.

The returned VM has not started: :meth:`VmceVm.start` resumes the guest where it was saved.
A #MC the model had marked pending but not yet delivered is queued for delivery on start.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from vmce.host.memory import P2mType
from vmce.kvm.boot import DirectBoot
from vmce.kvm.fdio import KvmError
from vmce.kvm.persist.image import VmImage, decode_image
from vmce.kvm.persist.index import StreamIndex, index_stream
from vmce.kvm.persist.pages import PlaceReport, place_pages
from vmce.kvm.persist.vendor import MachineFlag
from vmce.kvm.vmcevm import VmceVm, VmceVmConfig
from vmce.kvm.vstate import VmStateError, apply_machine, saved_msr_indices
from vmce.save.hvmrecords import VmceInflight
from vmce.vmce import Domain, HostProfile, RestoreError


class FileChanged(RuntimeError):
    """The stream file is not the one that was checked (it was replaced meanwhile)."""


class RestoreFailed(RuntimeError):
    """A checked stream that KVM or the model still refused while it was applied; the new VM
    was closed."""


@dataclass(frozen=True)
class BuildReport:
    """Step 3 of a restore: building the VM, placing its pages, applying its state."""

    pages: PlaceReport
    vm_seconds: float
    pages_seconds: float
    apply_seconds: float

    @property
    def seconds(self) -> float:
        return self.vm_seconds + self.pages_seconds + self.apply_seconds


@dataclass(frozen=True)
class RestoreReport:
    """How a restore went: where the pages came from and how long each step took
    (``index_seconds`` covers steps 1 and 2, checking the whole stream)."""

    build: BuildReport
    index_seconds: float
    total_seconds: float

    @property
    def pages(self) -> PlaceReport:
        return self.build.pages


def plan_restore(
    path: str | os.PathLike[str], *, profile: HostProfile | None = None
) -> tuple[StreamIndex, VmImage]:
    """Steps 1 and 2 only: everything a restore checks, without KVM."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        index = index_stream(fd)
    finally:
        os.close(fd)
    return index, decode_image(index, profile=profile)


def vm_config(image: VmImage, on_serial_line: Callable[[str], None] | None) -> VmceVmConfig:
    """The configuration of a VM that can take ``image`` (its boot state is overwritten)."""
    c = image.config
    flags = c.machine_flags
    return VmceVmConfig(
        boot=DirectBoot(0, 0, [0] * c.vcpus),
        vcpus=c.vcpus,
        memory_size=c.memory_size,
        profile=image.profile,
        cpu=image.cpu,
        policy=c.injection_policy(),
        irqchip=MachineFlag.IRQCHIP in flags,
        pit=MachineFlag.PIT in flags,
        on_serial_line=on_serial_line,
        domid=c.domid,
        host_mfn_base=c.host_mfn_base,
    )


def apply_inflight(domain: Domain, inflight: dict[int, VmceInflight]) -> None:
    """Put the saved in-flight vMCE (MCG_STATUS, banks 0-1, the pending flag) back."""
    for vid, f in inflight.items():
        v = domain.vcpus[vid]
        with v.lock:
            v.mcg_status = f.mcg_status
            b0, b1 = v.banks[0], v.banks[1]
            b0.status, b0.addr, b0.misc = f.bank0_status, f.bank0_addr, f.bank0_misc
            b1.status, b1.addr, b1.misc = f.bank1_status, f.bank1_addr, f.bank1_misc
            v.mce_pending = bool(f.mce_pending)


def apply_image(vm: VmceVm, image: VmImage) -> None:
    """Write a decoded image into a VM that has not started (RAM already in place)."""
    machine = vm.machine
    known = set(saved_msr_indices(machine.kvm.msr_index_list()))
    state = replace(
        image.machine,
        vcpus=[
            replace(v, msrs={k: x for k, x in v.msrs.items() if x or k in known})
            for v in image.machine.vcpus
        ],
    )
    try:
        apply_machine(machine, state)
    except (KvmError, OSError, VmStateError) as e:
        raise RestoreFailed(f"KVM refused the saved state: {e}") from e
    domain = vm.domain
    if image.mca_cap and domain.set_mca_cap(image.mca_cap):
        raise RestoreFailed(f"MCA_CAP {image.mca_cap:#x} refused")
    try:
        domain.restore(image.vmce)
    except RestoreError as e:  # checked by decode_image against the same profile
        raise RestoreFailed(str(e)) from e
    apply_inflight(domain, image.inflight)
    p2m = vm.host_memory.domains[domain.domid].p2m
    for gfn in image.broken:
        p2m[gfn].type = P2mType.RAM_BROKEN
    with vm.batch():  # a #MC the model had pending but not delivered: deliver it on start
        for v in domain.vcpus:
            if v.mce_pending:
                for kick in domain.on_pending:
                    kick(v.id)


def restore_from(
    path: str | os.PathLike[str],
    index: StreamIndex,
    image: VmImage,
    *,
    cow: bool,
    on_serial_line: Callable[[str], None] | None = None,
    expect: tuple[int, int, int] | None = None,
) -> tuple[VmceVm, BuildReport]:
    """Step 3 for an index and image of ``path`` (which must not have changed since).

    ``expect`` is the (size, inode, mtime_ns) the index was made from; a file that is no
    longer that one raises :class:`FileChanged` before anything is built.
    """
    t0 = time.perf_counter()
    try:
        # Opened before the VM is built: nothing to undo if this fails.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise RestoreFailed(f"cannot open {path}: {e.strerror}") from e
    if expect is not None:
        st = os.fstat(fd)
        if (st.st_size, st.st_ino, st.st_mtime_ns) != expect:
            os.close(fd)
            raise FileChanged(f"{path} changed after it was checked")
    try:
        vm = VmceVm(vm_config(image, on_serial_line))
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError):
            raise RestoreFailed(f"cannot build the VM: {e}") from e
        raise
    t1 = time.perf_counter()
    try:
        pages = place_pages(
            vm.machine.memory, fd, index.runs, cow=cow, zero_pfns=sorted(image.broken)
        )
        t2 = time.perf_counter()
        apply_image(vm, image)
    except BaseException as e:
        vm.close()
        if isinstance(e, OSError):
            raise RestoreFailed(f"cannot load guest RAM from {path}: {e}") from e
        raise
    finally:
        os.close(fd)
    return vm, BuildReport(pages, t1 - t0, t2 - t1, time.perf_counter() - t2)


def restore_vm(
    path: str | os.PathLike[str],
    *,
    profile: HostProfile | None = None,
    on_serial_line: Callable[[str], None] | None = None,
    cow: bool = False,
) -> VmceVm:
    """A new, not yet started VM continuing the one saved in ``path``.

    ``profile`` is this host's vMCE profile (default: the saving host's). ``cow`` maps guest
    RAM copy-on-write from the file instead of copying it (the file must then stay unchanged
    while the VM lives). Raises :class:`~vmce.save.stream.StreamError` for a stream it refuses
    (naming record and offset) and :class:`RestoreFailed` if KVM refuses the state.
    """
    vm, _ = restore_vm_report(path, profile=profile, on_serial_line=on_serial_line, cow=cow)
    return vm


def restore_vm_report(
    path: str | os.PathLike[str],
    *,
    profile: HostProfile | None = None,
    on_serial_line: Callable[[str], None] | None = None,
    cow: bool = False,
) -> tuple[VmceVm, RestoreReport]:
    """:func:`restore_vm` with timings and how the pages were placed."""
    t0 = time.perf_counter()
    index, image = plan_restore(path, profile=profile)
    t1 = time.perf_counter()
    vm, build = restore_from(Path(path), index, image, cow=cow, on_serial_line=on_serial_line)
    return vm, RestoreReport(build, t1 - t0, time.perf_counter() - t0)
