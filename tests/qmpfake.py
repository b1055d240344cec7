"""A stand-in for :class:`VmceVm` for control-socket tests that need no KVM: the real vMCE
model and host path, no vCPUs. A "guest" thread takes every pending #MC after ``handle_s``
seconds and clears MCIP, as the test guest's handler would."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vmce.host.memerr import HostMca
from vmce.host.memory import PAGE_SHIFT, GuestDomain, HostMemory
from vmce.kvm.stop import StopReason
from vmce.kvm.vmcevm import McDelivery
from vmce.kvm.x86.cpuid import INTEL_BROADWELL, CpuProfile
from vmce.vmce import Domain, HostProfile


@dataclass
class FakeConfig:
    vcpus: int = 2
    memory_size: int = 64 << 20
    domid: int = 1
    host_mfn_base: int = 0x100000
    cpu: CpuProfile = INTEL_BROADWELL

    def guest_cpu(self) -> CpuProfile:
        return self.cpu


@dataclass
class FakeMachine:
    stop_reason: StopReason | None = None
    runners: list[Any] = field(default_factory=list)

    def submit(self, vid: int, fn: Callable[..., Any]) -> Any:
        raise RuntimeError(f"vCPU {vid} stopped")


class FakeVm:
    def __init__(self, vcpus: int = 2, *, handle_s: float | None = 0.002) -> None:
        self.config = FakeConfig(vcpus)
        self.domain = Domain(HostProfile.intel(), vcpus, domid=1)
        self.host_memory = HostMemory()
        npages = self.config.memory_size >> PAGE_SHIFT
        self.host_memory.add_ram(self.config.host_mfn_base, npages)
        self.host_memory.add_domain(GuestDomain(self.domain))
        self.host_memory.assign(1, 0, self.config.host_mfn_base, npages)
        self.host_mca = HostMca(self.domain.profile, self.host_memory)
        self.machine = FakeMachine()
        self.on_delivery: list[Callable[[McDelivery], None]] = []
        self.msr_trace: Callable[[Any], None] | None = None
        self.deliveries: list[McDelivery] = []
        self.handled = 0
        self.paused = False
        self._handle_s = handle_s
        self.domain.on_pending.append(self._kick)

    def _kick(self, vid: int) -> None:
        if self._handle_s is None:
            return  # a guest that never finishes its handler
        t = threading.Timer(self._handle_s, self._handle, (vid, time.monotonic()))
        t.daemon = True
        t.start()

    def _handle(self, vid: int, requested: float) -> None:
        v = self.domain.vcpus[vid]
        if not v.take_pending():
            return
        d = McDelivery(vid, requested, time.monotonic(), True, "fake")
        self.deliveries.append(d)
        for listener in self.on_delivery:
            listener(d)
        with v.lock:
            v.mcg_status = 0
        self.handled += 1

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        yield

    def pause(self, timeout: float = 5.0) -> bool:
        self.paused = True
        return True

    def resume(self) -> None:
        self.paused = False
