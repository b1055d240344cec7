"""Saving a running VM to a libxc stream file: pause, capture, write, resume.

The VM is paused for the whole save (stop-and-copy, as ``xl save``), so memory and registers
are one consistent moment; with ``resume=True`` (``xl save -c``) it continues afterwards.
The file is written next to its final name and renamed into place, so a failed save never
leaves a truncated stream under that name.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from vmce.kvm.persist.cpumap import XsaveLayout
from vmce.kvm.persist.image import StreamParts, encode_image
from vmce.kvm.persist.pages import BatchPlan, flat_view, plan_batches, write_pages
from vmce.kvm.vmcevm import VmceVm
from vmce.kvm.vstate import PAUSE_TIMEOUT, VmStateError, capture_machine
from vmce.kvm.x86.cpuid import build_guest_cpuid
from vmce.save.hvmrecords import encode_context
from vmce.save.stream import PAGE_SIZE, Stream, StreamWriter


class SaveError(RuntimeError):
    """The VM could not be saved (it did not pause, it had stopped...); nothing was written."""


@dataclass(frozen=True)
class SaveReport:
    """What a save wrote and how long it took."""

    path: Path
    stream: Stream = field(repr=False)
    plan: BatchPlan = field(repr=False)
    seconds: float
    paused_seconds: float

    @property
    def size(self) -> int:
        return self.stream.size

    @property
    def mb_per_s(self) -> float:
        return self.size / (1 << 20) / self.seconds if self.seconds else 0.0


def write_image_stream(
    f: BinaryIO, parts: StreamParts, ram: memoryview
) -> tuple[Stream, BatchPlan]:
    """The whole stream: policies, page-aligned PAGE_DATA (see :mod:`vmce.kvm.persist.pages`),
    TSC info, parameters, the HVM context with its vendor trailer, END."""
    w = StreamWriter(f)
    w.write_headers()
    w.write_cpuid_policy(parts.cpuid)
    if parts.msr_policy:
        w.write_msr_policy(parts.msr_policy)
    w.write_static_data_end()
    plan = plan_batches(w.offset, len(ram) // PAGE_SIZE)
    write_pages(w, ram, plan, parts.broken)
    w.write_tsc_info(parts.tsc)
    w.write_hvm_params(parts.params)
    w.write_hvm_context(encode_context(parts.context, parts.inflight, parts.vendor))
    return w.write_end(), plan


def save_vm(
    vm: VmceVm,
    path: str | os.PathLike[str],
    *,
    vmce_size: int = 32,
    resume: bool = True,
    timeout: float = PAUSE_TIMEOUT,
) -> SaveReport:
    """Save the whole of a running (or paused) ``vm`` to ``path`` as a libxc v3 stream.

    ``vmce_size`` writes VMCE_VCPU records in the 8- or 24-byte form of older Xen versions.
    With ``resume`` the VM runs on after the save, else it stays paused (:meth:`VmceVm.pause`:
    a vMCE injected meanwhile is taken when it resumes, and saved with it if saved again).
    """
    target = Path(path)
    machine = vm.machine
    start = time.perf_counter()
    if not vm.pause(timeout):
        vm.resume()
        raise SaveError(f"the VM did not pause within {timeout} s")
    paused = time.perf_counter()
    tmp = target.with_name(f".{target.name}.part")
    try:
        try:
            state = capture_machine(machine, timeout)
        except VmStateError as e:
            raise SaveError(str(e)) from e
        supported = machine.kvm.supported_cpuid()
        cpuid = build_guest_cpuid(supported, profile=vm.config.guest_cpu(), apic_id=0)
        parts = encode_image(
            vm.config,
            vm.domain,
            vm.host_memory,
            state,
            cpuid=cpuid,
            xsave_layout=XsaveLayout.from_cpuid(supported),
            vmce_size=vmce_size,
        )
        with open(tmp, "wb") as f:
            stream, plan = write_image_stream(f, parts, flat_view(machine.memory))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        done = time.perf_counter()
        if resume:
            vm.resume()
    return SaveReport(target, stream, plan, done - start, done - paused)
