"""A KVM virtual machine whose MCA is Xen's vMCE: the model wired into the VMM.

* Guest RDMSR/WRMSR of every MSR Xen routes to the vMCE exits to user space (MSR filter) and
  is answered by the domain's :class:`~vmce.vmce.MsrTable`.
* A vMCE that the model marks pending is delivered on that vCPU's own thread: the vCPU is
  kicked, the flag acknowledged, and #MC (vector 18) injected with KVM_SET_VCPU_EVENTS.
* KVM_SET_VCPU_EVENTS applies no architectural rule, so this module applies the ones a CPU
  would: #MC with CR4.MCE clear shuts the guest down (triple fault); and when the model says
  the domain crashed (a vCPU still had MCG_STATUS.MCIP set, or a #MC still pending) the guest
  is shut down too. Either way the VMM reports it and keeps running.
* Host errors go through the host path (:mod:`vmce.host.memerr`): the guest's RAM is backed
  by host frames from ``host_mfn_base`` on, so a guest-physical address is translated back
  and forth exactly as Xen does it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from vmce.host.memerr import HostBank, HostMca, HostMceReport, PhysicalMce
from vmce.host.memory import PAGE_SHIFT, GuestDomain, HostMemory
from vmce.kvm.boot import BspBoot, DirectBoot
from vmce.kvm.machine import Machine, MachineConfig
from vmce.kvm.runner import RunnerState, VcpuRunner
from vmce.kvm.stop import StopReason
from vmce.kvm.vcpu import Vcpu
from vmce.kvm.vm import MsrRange
from vmce.kvm.x86.cpuid import AMD_ZEN3, INTEL_BROADWELL, CpuProfile
from vmce.mca.constants import CR4_MCE, MC_VECTOR
from vmce.mca.msr import AMD_THRESHOLD_MSRS, VMCE_ROUTED_RANGES
from vmce.vmce import BROADCAST, BankRecord, Crash, Delivery, Domain, HostProfile, InjectionPolicy

#: How often a #MC is retried while another exception occupies the vCPU's event slot.
MAX_DELIVERY_RETRIES = 200
RETRY_DELAY = 0.0005
#: How long a broadcast waits for each vCPU to stop at a safe point before giving up on it.
BARRIER_TIMEOUT = 1.0


@dataclass(frozen=True)
class McDelivery:
    """One #MC as the VMM delivered it (or why it could not)."""

    vcpu_id: int
    requested: float
    delivered: float
    accepted: bool
    detail: str


@dataclass(frozen=True)
class MsrAccess:
    """One guest access to a vMCE MSR, for tracing: ``value`` is None where it was #GP."""

    vcpu_id: int
    msr: int
    write: bool
    value: int | None
    time: float


@dataclass
class VmceVmConfig:
    """A VM with a vMCE: its size, boot, host profile, guest CPU and injection policy."""

    boot: DirectBoot | BspBoot
    vcpus: int = 1
    memory_size: int = 64 << 20
    profile: HostProfile = field(default_factory=HostProfile.intel)
    cpu: CpuProfile | None = None
    policy: InjectionPolicy = InjectionPolicy.BROADCAST
    irqchip: bool = False
    pit: bool = False
    on_serial_line: Callable[[str], None] | None = None
    domid: int = 1
    host_mfn_base: int = 0x100000

    def guest_cpu(self) -> CpuProfile:
        if self.cpu is not None:
            return self.cpu
        return AMD_ZEN3 if self.profile.is_amd_like else INTEL_BROADWELL


def filtered_msr_ranges(profile: HostProfile) -> list[MsrRange]:
    """The MSRs whose guest accesses go to the vMCE instead of KVM."""
    ranges = [MsrRange(first, count) for first, count in VMCE_ROUTED_RANGES]
    if profile.is_amd_like:
        ranges.append(MsrRange(AMD_THRESHOLD_MSRS[0], len(AMD_THRESHOLD_MSRS)))
    return ranges


class VmceVm:
    """The VMM (:class:`Machine`) plus the vMCE model (:class:`Domain`) and the host path."""

    def __init__(self, config: VmceVmConfig) -> None:
        self.config = config
        cpu = config.guest_cpu()
        guest_vendor = cpu.vendor
        self.domain = Domain(
            config.profile,
            config.vcpus,
            domid=config.domid,
            guest_vendor=guest_vendor,
            policy=config.policy,
        )
        self.host_memory = HostMemory()
        npages = config.memory_size >> PAGE_SHIFT
        self.host_memory.add_ram(config.host_mfn_base, npages)
        self.host_memory.add_domain(GuestDomain(self.domain))
        self.host_memory.assign(config.domid, 0, config.host_mfn_base, npages)
        self.host_mca = HostMca(config.profile, self.host_memory)
        self.deliveries: list[McDelivery] = []
        self.shutdown_reason: str | None = None
        #: Called on the vCPU's thread for every guest access to a vMCE MSR, when set.
        self.msr_trace: Callable[[MsrAccess], None] | None = None
        #: Called (on a vCPU thread) with every #MC delivery the VMM records.
        self.on_delivery: list[Callable[[McDelivery], None]] = []
        self._lock = threading.Lock()
        self._requested: dict[int, float] = {}
        self._batch: list[int] | None = None
        #: Serialises the user's pause/resume (and saves) with the broadcast barrier.
        self._pause_lock = threading.RLock()
        self._user_paused = False
        self._deferred: list[int] = []
        self.machine = Machine(
            MachineConfig(
                boot=config.boot,
                vcpus=config.vcpus,
                memory_size=config.memory_size,
                irqchip=config.irqchip,
                pit=config.pit,
                profile=cpu,
                msr_handler=self,
                filtered_msrs=filtered_msr_ranges(config.profile),
                on_serial_line=config.on_serial_line,
            )
        )
        self.domain.on_pending.append(self._schedule_delivery)
        self.domain.on_crash.append(self._on_crash)

    # -- MsrHandler: called on vCPU threads ---------------------------------------------------

    def rdmsr(self, vcpu_id: int, index: int) -> int | None:
        try:
            value = self.domain.rdmsr(vcpu_id, index)
        except KeyError:
            value = None  # filtered but not the vMCE's: behave like an unknown MSR
        if self.msr_trace is not None:
            self.msr_trace(MsrAccess(vcpu_id, index, False, value, time.monotonic()))
        return value

    def wrmsr(self, vcpu_id: int, index: int, value: int) -> bool:
        try:
            ok = self.domain.wrmsr(vcpu_id, index, value)
        except KeyError:
            ok = False
        if self.msr_trace is not None:
            self.msr_trace(MsrAccess(vcpu_id, index, True, value if ok else None, time.monotonic()))
        return ok

    # -- injection ----------------------------------------------------------------------------

    def inject(self, record: BankRecord, mcg_status: int, target: int = BROADCAST) -> Delivery:
        """Put ``record`` into the guest's vMCE and raise #MC, as Xen's fill and inject do."""
        with self.batch():
            return self.domain.deliver(record, mcg_status, target)

    def memory_error(
        self,
        gpa: int,
        status: int,
        *,
        misc: int = 0x86,
        mcg_status: int = 0x5,
        bank: int = 9,
        running_vcpu: int | None = None,
    ) -> HostMceReport:
        """A host machine check on the frame backing guest-physical ``gpa``, through Xen's
        host path (offline, mark broken, translate, fill, inject)."""
        if not 0 <= gpa < self.config.memory_size:
            raise ValueError(
                f"guest-physical address {gpa:#x} is outside the guest's "
                f"{self.config.memory_size >> 20} MiB"
            )
        mfn = self.host_memory.gfn_to_mfn(self.domain.domid, gpa >> PAGE_SHIFT)
        haddr = (mfn << PAGE_SHIFT) | (gpa & ((1 << PAGE_SHIFT) - 1))
        mce = PhysicalMce(
            cpu=0,
            mcg_status=mcg_status,
            banks=(HostBank(bank, status, haddr, misc),),
            running_domid=self.domain.domid if running_vcpu is not None else 0x7FFF,
            running_vcpu=running_vcpu if running_vcpu is not None else 0xFFFF,
        )
        with self.batch():
            return self.host_mca.handle(mce)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Collect the #MCs the model marks pending inside the block and deliver them together.

        A broadcast then reaches every vCPU at once, as on hardware: all target vCPUs are
        stopped at a safe point, each sets its #MC on its own thread, and all resume together,
        so no vCPU spins in the guest's rendezvous while another has not been given its #MC.
        """
        with self._lock:
            outer = self._batch is None
            if outer:
                self._batch = []
        try:
            yield
        finally:
            if outer:
                with self._lock:
                    vids, self._batch = self._batch or [], None
                if vids:
                    self._deliver_together(vids)

    def _schedule_delivery(self, vcpu_id: int) -> None:
        """``on_pending``: kick the vCPU so it takes the #MC on its own thread."""
        with self._lock:
            self._requested[vcpu_id] = time.monotonic()
            if self._batch is not None:
                self._batch.append(vcpu_id)
                return
        self._deliver_together([vcpu_id])

    def _deliver_together(self, vids: list[int]) -> None:
        """Deliver the #MCs pending on ``vids``: behind a barrier when there are several, and
        not at all while the VM is paused (they stay pending in the model, so a save carries
        them, and are delivered on :meth:`resume`)."""
        with self._pause_lock:
            if self._user_paused:
                self._deferred.extend(vids)
                return
            runners = [self.machine.runners[v] for v in vids]
            barrier = (
                len(vids) > 1
                and all(r.state in (RunnerState.RUNNING, RunnerState.HALTED) for r in runners)
                and not any(r.on_vcpu_thread for r in runners)
            )
            paused: list[VcpuRunner] = []
            try:
                if barrier:
                    for r in runners:
                        r.pause()
                        paused.append(r)
                    barrier = all(r.wait_parked(BARRIER_TIMEOUT) for r in runners)
                futures = [
                    self.machine.submit(v, lambda vcpu: self._deliver(vcpu, 0)) for v in vids
                ]
                if barrier:
                    for f in futures:
                        with contextlib.suppress(Exception):
                            f.result(BARRIER_TIMEOUT)
            finally:
                for r in paused:  # a vCPU that did not park in time is let go all the same
                    r.resume()

    def _deliver(self, vcpu: Vcpu, attempt: int) -> None:
        """On ``vcpu``'s thread: take the pending #MC into the CPU, or shut the guest down
        saying why; an error here must not lose the #MC silently."""
        vid = vcpu.vcpu_id
        try:
            self._deliver_once(vcpu, attempt)
        except Exception as exc:  # KVM refused the state, or a listener failed
            with self._lock:
                requested = self._requested.get(vid, time.monotonic())
            self._record(vid, requested, False, f"delivery failed: {exc}", notify=False)
            self._shutdown(vid, f"vCPU {vid}: #MC delivery failed ({exc})")

    def _deliver_once(self, vcpu: Vcpu, attempt: int) -> None:
        vid = vcpu.vcpu_id
        if attempt == 0 and not self.domain.vcpus[vid].take_pending():
            return
        with self._lock:
            requested = self._requested.get(vid, time.monotonic())
        if not vcpu.get_sregs().cr4 & CR4_MCE:
            self._record(vid, requested, False, "CR4.MCE is clear: the CPU shuts down")
            self._shutdown(vid, f"vCPU {vid} took #MC with CR4.MCE clear (triple fault)")
            return
        result = self.machine.inject_exception_now(vcpu, MC_VECTOR)
        if result.accepted:
            self._record(vid, requested, True, result.detail)
            return
        if attempt < MAX_DELIVERY_RETRIES:  # another exception is in flight: retry shortly
            timer = threading.Timer(
                RETRY_DELAY,
                lambda: self.machine.submit(vid, lambda v: self._deliver(v, attempt + 1)),
            )
            timer.daemon = True
            timer.start()
            return
        self._record(vid, requested, False, result.detail)
        self._shutdown(vid, f"vCPU {vid}: #MC could not be delivered ({result.detail})")

    def _record(
        self, vid: int, requested: float, ok: bool, detail: str, *, notify: bool = True
    ) -> None:
        d = McDelivery(vid, requested, time.monotonic(), ok, detail)
        with self._lock:
            self.deliveries.append(d)
        if notify:
            for listener in list(self.on_delivery):
                listener(d)

    def _on_crash(self, crash: Crash) -> None:
        self._shutdown(0, f"domain crashed: {crash.reason}")

    def _shutdown(self, vcpu_id: int, reason: str) -> None:
        with self._lock:
            if self.shutdown_reason is None:
                self.shutdown_reason = reason
        self.machine.request_shutdown(vcpu_id, reason)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.machine.start()

    def wait(self, timeout: float | None = None) -> StopReason | None:
        return self.machine.wait(timeout)

    def pause(self, timeout: float = 5.0) -> bool:
        """Stop every vCPU at a safe point (a vMCE injected meanwhile is taken on resume)."""
        with self._pause_lock:
            self._user_paused = True
            return self.machine.pause(timeout)

    def resume(self) -> None:
        """Let the vCPUs run again, and deliver the #MCs that became pending meanwhile."""
        with self._pause_lock:
            self._user_paused = False
            self.machine.resume()
            deferred, self._deferred = self._deferred, []
            if deferred:
                self._deliver_together(sorted(set(deferred)))

    def stop(self, reason: str = "stopped by the host") -> None:
        self.machine.stop(reason)

    def close(self) -> None:
        self.machine.close()

    def __enter__(self) -> VmceVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
