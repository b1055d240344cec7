"""Stock Debian Linux in the vmce VMM: the 64-bit boot protocol, an MP table, the console.

The kernel's vmlinux is loaded at its physical addresses and entered at ``startup_64`` on the
BSP; the APs wait for INIT/SIPI in the in-kernel LAPIC. The guest's MCA MSRs are the vMCE's.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vmce.guest.events import GuestEvent
from vmce.guest.linux import bootparams
from vmce.guest.linux.material import Material
from vmce.kvm.boot import BspBoot
from vmce.kvm.devices import i8042
from vmce.kvm.pvm import linux_cmdline_fixups
from vmce.kvm.stop import StopKind, StopReason
from vmce.kvm.vmcevm import VmceVm, VmceVmConfig
from vmce.kvm.x86.cpuid import CpuProfile
from vmce.kvm.x86.mptable import MPTABLE_START, build_mptable
from vmce.vmce import HostProfile, InjectionPolicy

ZERO_PAGE = 0x10000
CMDLINE = 0x11000
BSP_STACK = 0x20000
PRINTK_TIME = re.compile(r"^\[\s*\d+\.\d+\]\s?")

#: What every run passes (feasibility.md 4.1): serial console, no ACPI/PCI, fast failure.
BASE_CMDLINE = (
    "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 acpi=off pci=off "
    "i8042.noaux i8042.nokbd i8042.nopnp cryptomgr.notests init_on_alloc=0 mitigations=off "
    "tsc=reliable no_timer_check audit=0 rdinit=/init nowatchdog"
)


@dataclass
class LinuxConfig:
    """A Linux guest as a user states it."""

    vcpus: int = 2
    memory_mib: int = 256
    profile: HostProfile = field(default_factory=HostProfile.intel)
    cpu: CpuProfile | None = None
    policy: InjectionPolicy = InjectionPolicy.BROADCAST
    #: Linux's ``mce=N`` (6.1: the monarch timeout in microseconds); None keeps 1 s.
    monarch_timeout_us: int | None = 2000
    #: ``mce=print_all``: log every machine-check record, also those the kernel recovered.
    print_all: bool = True
    extra_cmdline: list[str] = field(default_factory=list)
    pvm_fixups: bool | None = None

    def cmdline(self) -> str:
        words = [BASE_CMDLINE, *linux_cmdline_fixups(self.pvm_fixups)]
        if self.monarch_timeout_us is not None:
            words.append(f"mce={self.monarch_timeout_us}")
        if self.print_all:
            words.append("mce=print_all")
        return " ".join([*words, *self.extra_cmdline])


class LinuxGuest:
    """A booting or booted Linux guest with its console."""

    def __init__(
        self,
        config: LinuxConfig,
        material: Material,
        on_line: Callable[[str], None] | None = None,
        *,
        restore_from: Callable[[Callable[[str], None]], VmceVm] | None = None,
    ) -> None:
        """Build and load a fresh guest, or (``restore_from``) take a restored VM, which that
        function builds with this guest's console callback."""
        self.config = config
        self.material = material
        self.lines: list[str] = []
        self.times: list[float] = []
        #: Stock Linux prints no ``@vmce`` events (the attribute matches the test guest's).
        self.events: list[GuestEvent] = []
        self._cond = threading.Condition()
        self._on_line = on_line
        self.started_at = 0.0
        if restore_from is not None:
            self.vm = restore_from(self._line)
            self._attach_devices()
            return
        self.vm = VmceVm(
            VmceVmConfig(
                boot=BspBoot(0, ZERO_PAGE, BSP_STACK),  # entry set in _load
                vcpus=config.vcpus,
                memory_size=config.memory_mib << 20,
                profile=config.profile,
                cpu=config.cpu,
                policy=config.policy,
                irqchip=True,
                pit=True,
                on_serial_line=self._line,
            )
        )
        try:
            self._load()
        except BaseException:
            self.vm.close()
            raise

    def _load(self) -> None:
        kernel = self.material.kernel()
        mem = self.vm.machine.memory
        size = self.config.memory_mib << 20
        for seg in kernel.vmlinux.segments:
            if seg.paddr + seg.memsz > size:
                raise ValueError(f"the kernel needs {(seg.paddr + seg.memsz) >> 20} MiB of RAM")
            mem.write(seg.paddr, seg.data)
        cmdline = self.config.cmdline().encode() + b"\0"
        if len(cmdline) > kernel.header.cmdline_size:
            raise ValueError(f"command line longer than the kernel's {kernel.header.cmdline_size}")
        mem.write(CMDLINE, cmdline)
        initrd = self.material.initramfs.read_bytes()
        initrd_addr = (size - len(initrd) - 0x100000) & ~0xFFF
        mem.write(initrd_addr, initrd)
        mem.write(MPTABLE_START, build_mptable(self.config.vcpus))
        mem.write(
            ZERO_PAGE,
            bootparams.build(
                kernel.header,
                cmdline_addr=CMDLINE,
                initrd_addr=initrd_addr,
                initrd_size=len(initrd),
                e820=bootparams.memory_map(size),
            ),
        )
        regs = self.vm.machine.vcpus[0].get_regs()
        regs.rip = kernel.vmlinux.entry
        self.vm.machine.vcpus[0].set_regs(regs)
        self._attach_devices()

    def _attach_devices(self) -> None:
        self.vm.machine.bus.register(i8042.BASE, i8042.LENGTH, i8042.I8042(self._reset), "i8042")

    def _reset(self, vcpu_id: int) -> None:
        self.vm.machine.stop(
            StopReason(
                StopKind.SYSTEM_EVENT, f"vCPU {vcpu_id}: the guest reset itself (i8042)", vcpu_id
            )
        )

    def _line(self, line: str) -> None:
        with self._cond:
            self.lines.append(line)
            self.times.append(time.monotonic())
            self._cond.notify_all()
        if self._on_line is not None:
            self._on_line(line)

    @property
    def messages(self) -> list[str]:
        """The console lines without printk's timestamps."""
        with self._cond:
            return [PRINTK_TIME.sub("", ln) for ln in self.lines]

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.vm.start()

    def wait_for_line(self, text: str, timeout: float) -> str:
        """The first console line containing ``text``; ``TimeoutError`` says what came last."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for ln in self.lines[seen:]:
                    if text in ln:
                        return ln
                seen = len(self.lines)
                stop = self.vm.machine.stop_reason
                left = deadline - time.monotonic()
                if stop is not None or left <= 0:
                    tail = "\n".join(self.lines[-6:])
                    why = f"the VM stopped: {stop}" if stop else f"{timeout:.0f} s passed"
                    raise TimeoutError(f"no console line with {text!r}; {why}\n{tail}")
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        self.vm.close()

    def __enter__(self) -> LinuxGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
