"""The VMM: one VM, N vCPU threads, devices, exit dispatch, injection, pause and teardown.

Boot modes (:mod:`vmce.kvm.boot`): :class:`DirectBoot` (every vCPU enters 64-bit mode at
the same RIP; test guests) and :class:`BspBoot` (vCPU 0 only; APs wait for INIT/SIPI; Linux).

An exception raised while handling an exit stops this VM with a :class:`StopReason`; it never
reaches the caller's thread or kills the process.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from vmce.kvm import events
from vmce.kvm.abi import ExitReason, InternalError, IoDirection, MpState, MsrExitReason, SystemEvent
from vmce.kvm.boot import BspBoot, DirectBoot, apply_boot
from vmce.kvm.devices.bus import PortBus
from vmce.kvm.devices.debugexit import DEFAULT_PORT as DEBUG_EXIT_PORT
from vmce.kvm.devices.debugexit import DebugExit
from vmce.kvm.devices.serial import COM1_BASE, COM1_IRQ, PORT_COUNT, Serial16550
from vmce.kvm.events import Injection
from vmce.kvm.memory import GuestMemory
from vmce.kvm.pvm import PvmFixups, host_is_pvm, read_emulation_failure
from vmce.kvm.runner import ExitAction, VcpuRunner, install_kick_handler
from vmce.kvm.stop import StopKind, StopReason
from vmce.kvm.system import DEFAULT_DEVICE, Kvm
from vmce.kvm.vcpu import Vcpu
from vmce.kvm.vm import MsrRange, Vm
from vmce.kvm.x86.cpuid import CpuProfile, build_guest_cpuid
from vmce.kvm.x86.layout import DEFAULT_LAYOUT, BootLayout

log = logging.getLogger("vmce.kvm")
T = TypeVar("T")
U64 = (1 << 64) - 1
JOIN_TIMEOUT = 5.0


class MsrHandler(Protocol):
    """Answers the guest's filtered RDMSR/WRMSR (called on the vCPU's thread)."""

    def rdmsr(self, vcpu_id: int, index: int) -> int | None:
        """The value read, or None to inject #GP."""
        ...

    def wrmsr(self, vcpu_id: int, index: int, value: int) -> bool:
        """True if the write is accepted, False to inject #GP."""
        ...


@dataclass(frozen=True)
class MmioAccess:
    """An MMIO exit (no MMIO devices exist yet: reads return 0, writes are dropped)."""

    vcpu_id: int
    gpa: int
    size: int
    is_write: bool
    data: bytes


@dataclass
class MachineConfig:
    """Everything a :class:`Machine` is built from."""

    boot: DirectBoot | BspBoot
    vcpus: int = 1
    memory_size: int = 64 << 20
    irqchip: bool = False
    pit: bool = False
    profile: CpuProfile | None = None
    msr_handler: MsrHandler | None = None
    filtered_msrs: Sequence[MsrRange] = ()
    msr_exit_reasons: MsrExitReason = MsrExitReason.FILTER
    exception_payload: bool = True
    serial: bool = True
    on_serial_line: Callable[[str], None] | None = None
    debug_exit_port: int | None = DEBUG_EXIT_PORT
    on_mmio: Callable[[MmioAccess], int | None] | None = None
    pvm_fixups: bool | None = None
    layout: BootLayout = field(default_factory=lambda: DEFAULT_LAYOUT)
    kvm_path: str = DEFAULT_DEVICE


class Machine:
    """A VM with its vCPU threads. Build it, load the guest into :attr:`memory`, :meth:`run`."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self._validate()
        install_kick_handler()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._stop_reason: StopReason | None = None
        self._shutdown_requests: dict[int, str] = {}
        self._started = False
        self._closed = False
        self.vcpus: list[Vcpu] = []
        self.runners: list[VcpuRunner] = []
        self.exit_counts: list[Counter[str]] = []
        self.bus = PortBus()
        self.serial: Serial16550 | None = None
        self.vm: Vm | None = None
        enable_fixups = host_is_pvm() if config.pvm_fixups is None else config.pvm_fixups
        self.fixups = PvmFixups(enable_fixups)
        self.kvm = Kvm(config.kvm_path)
        try:
            self.memory = GuestMemory.flat(config.memory_size)
        except BaseException:
            self.kvm.close()
            raise
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # --- construction --------------------------------------------------------------------

    def _validate(self) -> None:
        c = self.config
        if c.vcpus < 1:
            raise ValueError("a machine needs at least one vCPU")
        if isinstance(c.boot, BspBoot) and not c.irqchip:
            raise ValueError("BSP boot needs irqchip=True (APs wait for INIT/SIPI in the LAPIC)")
        if isinstance(c.boot, DirectBoot) and len(c.boot.stacks) != c.vcpus:
            raise ValueError(f"DirectBoot needs {c.vcpus} stacks, got {len(c.boot.stacks)}")
        if c.pit and not c.irqchip:
            raise ValueError("the in-kernel PIT needs irqchip=True")

    def _build(self) -> None:
        c = self.config
        vm = self.vm = Vm(self.kvm)
        vm.set_memory(self.memory)
        vm.set_tss_addr()
        if c.irqchip:
            vm.create_irqchip()
            if c.pit:
                vm.create_pit2()
        if c.filtered_msrs:
            vm.enable_user_space_msr(c.msr_exit_reasons)
            vm.set_msr_filter(c.filtered_msrs)
        elif c.msr_exit_reasons != MsrExitReason.FILTER:
            vm.enable_user_space_msr(c.msr_exit_reasons)
        vm.enable_triple_fault_event()
        if c.exception_payload:
            vm.enable_exception_payload()
        supported = self.kvm.supported_cpuid()
        for index in range(c.vcpus):
            vcpu = Vcpu(vm, index)
            self.vcpus.append(vcpu)
            vcpu.set_cpuid(build_guest_cpuid(supported, profile=c.profile, apic_id=index))
            self.exit_counts.append(Counter())
            self.runners.append(VcpuRunner(vcpu, self._handle_exit, self._on_vcpu_error))
        apply_boot(self.memory, self.vcpus, c.boot, c.layout, irqchip=c.irqchip)
        self._attach_devices()

    def _attach_devices(self) -> None:
        c = self.config
        if c.serial:
            raise_irq = self._pulse_irq(COM1_IRQ) if c.irqchip else None
            self.serial = Serial16550(c.on_serial_line, raise_irq)
            self.bus.register(COM1_BASE, PORT_COUNT, self.serial, "serial0 (16550A)")
        if c.debug_exit_port is not None:
            self.bus.register(c.debug_exit_port, 1, DebugExit(self._guest_exit), "debug-exit")

    def _pulse_irq(self, irq: int) -> Callable[[], None]:
        def pulse() -> None:
            vm = self.vm
            if vm is not None:
                vm.irq_line(irq, 1)
                vm.irq_line(irq, 0)

        return pulse

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start every vCPU thread."""
        with self._lock:
            if self._started or self._closed:
                raise RuntimeError("a Machine can be started once")
            self._started = True
        for runner in self.runners:
            runner.start()

    def wait(self, timeout: float | None = None) -> StopReason | None:
        """Block until the VM stops (its reason) or ``timeout`` passes (None)."""
        self._stopped.wait(timeout)
        return self._stop_reason

    def run(self, timeout: float | None = None) -> StopReason:
        """Start, wait for the stop, and return why; a timeout stops the VM and says so."""
        self.start()
        reason = self.wait(timeout)
        if reason is None:
            self.stop(StopReason(StopKind.TIMEOUT, f"the VM was still running after {timeout} s"))
        assert self._stop_reason is not None
        return self._stop_reason

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the VM stopped (None while running)."""
        return self._stop_reason

    def stop(self, reason: StopReason | str = "stopped by the host") -> None:
        """Stop every vCPU (the first reason given is kept)."""
        if isinstance(reason, str):
            reason = StopReason(StopKind.HOST_STOP, reason)
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason
                log.info("VM stopped: %s", reason.message)
        self._stopped.set()
        for runner in self.runners:
            runner.stop()

    def pause(self, timeout: float = 5.0) -> bool:
        """Park every vCPU at a safe point; False if one did not park within ``timeout``."""
        for runner in self.runners:
            runner.pause()
        return all(runner.wait_parked(timeout) for runner in self.runners)

    def resume(self) -> None:
        """Let parked vCPUs run again."""
        for runner in self.runners:
            runner.resume()

    def close(self) -> None:
        """Stop, join the threads, close vCPU and VM fds, unmap memory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._stop_reason is None:
            self.stop("the VM was closed")
        stuck = [r.vcpu.vcpu_id for r in self.runners if not r.join(JOIN_TIMEOUT)]
        if stuck:
            log.error("vCPU threads %s did not stop; leaking their fds", stuck)
        for vcpu in self.vcpus:
            if vcpu.vcpu_id not in stuck:
                vcpu.close()
        if self.vm is not None and not stuck:
            self.vm.close()
        if not stuck:
            self.memory.close()
        self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests run on vCPU threads ----------------------------------------------------

    def submit(self, vcpu_id: int, fn: Callable[[Vcpu], T]) -> Future[T]:
        """Run ``fn(vcpu)`` on vCPU ``vcpu_id``'s own thread (at a safe point)."""
        return self.runners[vcpu_id].submit(fn)

    def inject_exception(
        self, vcpu_id: int, vector: int, error_code: int | None = None
    ) -> Future[Injection]:
        """Queue exception ``vector`` for vCPU ``vcpu_id``; the future tells what happened.

        Runs on the vCPU thread: GET_VCPU_EVENTS, refuse if an exception is already in flight,
        set it injected (or pending + VALID_PAYLOAD with KVM_CAP_EXCEPTION_PAYLOAD),
        SET_VCPU_EVENTS, and wake the vCPU if it was halted.
        """
        events.validate_vector(vector)
        return self.runners[vcpu_id].submit(
            lambda vcpu: self.inject_exception_now(vcpu, vector, error_code)
        )

    def inject_exception_now(
        self, vcpu: Vcpu, vector: int, error_code: int | None = None
    ) -> Injection:
        """The body of :meth:`inject_exception`, for code already on ``vcpu``'s thread."""
        runner = self.runners[vcpu.vcpu_id]
        vm = self._vm()
        result = events.inject_exception(
            vcpu,
            vector,
            error_code=error_code,
            use_payload=vm.exception_payload,
            has_irqchip=vm.has_irqchip,
        )
        if result.accepted and runner.halted:
            runner.wake()
            result = Injection(result.vcpu_id, vector, True, result.detail, woke_halted=True)
        return result

    def request_shutdown(self, vcpu_id: int, reason: str) -> None:
        """Shut the VM down as a triple fault of vCPU ``vcpu_id`` would.

        With KVM_CAP_X86_TRIPLE_FAULT_EVENT the vCPU gets ``triple_fault.pending`` and KVM
        answers with KVM_EXIT_SHUTDOWN; without it the VM is stopped directly. Either way the
        stop reason names ``reason``.
        """
        vm = self._vm()
        if not vm.triple_fault_event:
            self.stop(
                StopReason(
                    StopKind.SHUTDOWN_REQUESTED,
                    f"vCPU {vcpu_id}: shutdown requested by the VMM ({reason})",
                    vcpu_id,
                )
            )
            return
        runner = self.runners[vcpu_id]
        with self._lock:
            self._shutdown_requests[vcpu_id] = reason

        def request(vcpu: Vcpu) -> None:
            events.request_triple_fault(vcpu)
            if vm.has_irqchip:
                vcpu.set_mp_state(MpState.RUNNABLE)
            runner.wake()

        runner.submit(request)

    def _vm(self) -> Vm:
        if self.vm is None:
            raise RuntimeError("the machine has no VM")
        return self.vm

    # --- exits (on vCPU threads) ---------------------------------------------------------

    def _handle_exit(self, vcpu: Vcpu) -> ExitAction:
        raw = int(vcpu.run.exit_reason)
        handler = _DISPATCH.get(raw)
        if handler is None:
            name = _EXIT_NAMES.get(raw, f"unknown exit reason {raw}")
            return self._stop_vcpu(vcpu, StopKind.UNHANDLED_EXIT, f"unhandled exit {name} ({raw})")
        self.exit_counts[vcpu.vcpu_id][_EXIT_NAMES[raw]] += 1
        return handler(self, vcpu)

    def _exit_io(self, vcpu: Vcpu) -> ExitAction:
        io = vcpu.run.io
        size, count, port = int(io.size), int(io.count), int(io.port)
        vid = vcpu.vcpu_id
        if io.direction == IoDirection.OUT:
            data = vcpu.io_data(size * count)
            for i in range(count):
                value = int.from_bytes(data[i * size : (i + 1) * size], "little")
                self.bus.write(vid, port, size, value)
        else:
            out = b"".join(
                self.bus.read(vid, port, size).to_bytes(size, "little") for _ in range(count)
            )
            vcpu.set_io_data(out)
        return ExitAction.CONTINUE

    def _exit_mmio(self, vcpu: Vcpu) -> ExitAction:
        mmio = vcpu.run.mmio
        size = int(mmio.len)
        access = MmioAccess(
            vcpu.vcpu_id, int(mmio.phys_addr), size, bool(mmio.is_write), bytes(mmio.data[:size])
        )
        value = self.config.on_mmio(access) if self.config.on_mmio is not None else None
        if value is None:
            log.debug("unhandled MMIO %s", access)
        if not access.is_write:
            for i, byte in enumerate((value or 0).to_bytes(8, "little")[:size]):
                mmio.data[i] = byte
        return ExitAction.CONTINUE

    def _exit_msr(self, vcpu: Vcpu) -> ExitAction:
        run = vcpu.run
        msr = run.msr
        handler = self.config.msr_handler
        if run.exit_reason == ExitReason.X86_RDMSR:
            value = handler.rdmsr(vcpu.vcpu_id, msr.index) if handler is not None else None
            if value is None:
                msr.error = 1
            else:
                msr.data = value & U64
        else:
            ok = handler.wrmsr(vcpu.vcpu_id, msr.index, msr.data) if handler else False
            if not ok:
                msr.error = 1
        return ExitAction.CONTINUE

    def _exit_hlt(self, vcpu: Vcpu) -> ExitAction:
        # Only without an in-kernel LAPIC: wait until a request (e.g. an injection) wakes us.
        return ExitAction.HALT

    def _exit_continue(self, vcpu: Vcpu) -> ExitAction:
        return ExitAction.CONTINUE

    def _exit_shutdown(self, vcpu: Vcpu) -> ExitAction:
        with self._lock:
            requested = self._shutdown_requests.pop(vcpu.vcpu_id, None)
        if requested is not None:
            return self._stop_vcpu(
                vcpu,
                StopKind.SHUTDOWN_REQUESTED,
                f"shutdown requested by the VMM ({requested}), delivered as a triple fault",
            )
        return self._stop_vcpu(
            vcpu,
            StopKind.SHUTDOWN,
            "triple fault: an exception could not be delivered (KVM_EXIT_SHUTDOWN)",
        )

    def _exit_internal_error(self, vcpu: Vcpu) -> ExitAction:
        rip = int(vcpu.get_regs().rip)
        failure = read_emulation_failure(vcpu.run, rip)
        if failure is not None:
            if self.fixups.try_fix(vcpu, failure) is not None:
                return ExitAction.CONTINUE
            return self._stop_vcpu(
                vcpu,
                StopKind.EMULATION_FAILURE,
                f"KVM's instruction emulator failed on {failure.describe()}",
            )
        internal = vcpu.run.internal
        sub = int(internal.suberror)
        try:
            name = InternalError(sub).name
        except ValueError:
            name = "unknown"
        data = [hex(int(internal.data[i])) for i in range(min(int(internal.ndata), 16))]
        return self._stop_vcpu(
            vcpu,
            StopKind.INTERNAL_ERROR,
            f"KVM internal error, suberror {sub} ({name}) at RIP {rip:#x}, data {data}",
        )

    def _exit_fail_entry(self, vcpu: Vcpu) -> ExitAction:
        why = int(vcpu.run.fail_entry.hardware_entry_failure_reason)
        return self._stop_vcpu(
            vcpu, StopKind.FAIL_ENTRY, f"VM entry failed, hardware reason {why:#x}"
        )

    def _exit_system_event(self, vcpu: Vcpu) -> ExitAction:
        kind = int(vcpu.run.system_event.type)
        words = {
            SystemEvent.SHUTDOWN: "the guest powered off",
            SystemEvent.RESET: "the guest asked for a reset",
            SystemEvent.CRASH: "the guest reported a crash",
        }
        try:
            text = words.get(SystemEvent(kind), f"system event {SystemEvent(kind).name}")
        except ValueError:
            text = f"system event {kind}"
        return self._stop_vcpu(vcpu, StopKind.SYSTEM_EVENT, text)

    def _stop_vcpu(self, vcpu: Vcpu, kind: StopKind, text: str) -> ExitAction:
        rip: int | None
        try:
            rip = int(vcpu.get_regs().rip)
        except OSError:
            rip = None
        where = f" (RIP {rip:#x})" if rip is not None and "RIP" not in text else ""
        self.stop(StopReason(kind, f"vCPU {vcpu.vcpu_id}: {text}{where}", vcpu.vcpu_id, rip=rip))
        return ExitAction.STOP

    def _guest_exit(self, vcpu_id: int, code: int) -> None:
        self.stop(
            StopReason(
                StopKind.GUEST_EXIT,
                f"vCPU {vcpu_id}: the guest exited with code {code:#x}",
                vcpu_id,
                exit_code=code,
            )
        )

    def _on_vcpu_error(self, vcpu: Vcpu, exc: BaseException) -> None:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        log.error("vCPU %d: VMM error\n%s", vcpu.vcpu_id, traceback.format_exc())
        self.stop(
            StopReason(
                StopKind.VMM_ERROR,
                f"vCPU {vcpu.vcpu_id}: the VMM failed while handling an exit: {detail}",
                vcpu.vcpu_id,
            )
        )


_DISPATCH: dict[int, Callable[[Machine, Vcpu], ExitAction]] = {
    ExitReason.IO: Machine._exit_io,
    ExitReason.MMIO: Machine._exit_mmio,
    ExitReason.X86_RDMSR: Machine._exit_msr,
    ExitReason.X86_WRMSR: Machine._exit_msr,
    ExitReason.HLT: Machine._exit_hlt,
    ExitReason.INTR: Machine._exit_continue,
    ExitReason.IRQ_WINDOW_OPEN: Machine._exit_continue,
    ExitReason.SHUTDOWN: Machine._exit_shutdown,
    ExitReason.INTERNAL_ERROR: Machine._exit_internal_error,
    ExitReason.FAIL_ENTRY: Machine._exit_fail_entry,
    ExitReason.SYSTEM_EVENT: Machine._exit_system_event,
}
_EXIT_NAMES: dict[int, str] = {int(reason): reason.name for reason in ExitReason}
