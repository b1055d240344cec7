"""The vmce test guest: building it, its boot-info block, and what it reports.

The guest's sources live in ``guests/testguest/`` (C and assembly). They are compiled with the
machine's gcc and ld into the user's cache directory the first time they are needed, keyed by a
hash of the sources, so a binary is never committed and never stale.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from pathlib import Path

from vmce.guest.elf import ElfImage
from vmce.guest.events import GuestEvent, parse_event
from vmce.kvm.boot import DirectBoot
from vmce.kvm.persist import SaveReport, Snapshot, restore_vm, save_vm
from vmce.kvm.vmcevm import VmceVm, VmceVmConfig
from vmce.kvm.x86.cpuid import CpuProfile
from vmce.save.layout import Layout, raw, u32, u64
from vmce.vmce import HostProfile, InjectionPolicy

BOOTINFO_MAGIC = 0x45434D56
BOOTINFO_VERSION = 1
MAX_CPUS = 32
MAX_PROBES = 256
MONARCH_DEFAULT = 0xFFFFFFFF
EXIT_PORT = 0x501


class ExitCode(IntEnum):
    """What the guest writes to the exit port."""

    DONE = 0x01
    PANIC = 0x02


class Flags(IntFlag):
    NONE = 0
    NO_CR4_MCE = 1 << 0
    KEEP_MCIP = 1 << 1
    VERBOSE = 1 << 2


class Mode(IntEnum):
    WORK = 0
    PROBE = 1


class Work(IntEnum):
    KERNEL = 0
    USER = 1
    IDLE = 2


class ProbeOp(IntEnum):
    RDMSR = 0
    WRMSR = 1


@dataclass(frozen=True)
class Probe(Layout):
    """One MSR access for the guest's probe mode (``struct probe``)."""

    op: int = u32()
    msr: int = u32()
    value: int = u64()


@dataclass(frozen=True)
class BootInfo(Layout):
    """``struct bootinfo`` (guests/testguest/bootinfo.h), written into guest memory."""

    magic: int = u32(BOOTINFO_MAGIC)
    version: int = u32(BOOTINFO_VERSION)
    ncpus: int = u32(1)
    flags: int = u32()
    mode: int = u32()
    monarch_timeout_us: int = u32(MONARCH_DEFAULT)
    tsc_khz: int = u64()
    mem_bytes: int = u64()
    work: bytes = raw(MAX_CPUS)
    nprobes: int = u32()
    reserved: int = u32()
    probes: bytes = raw(MAX_PROBES * 16)


@dataclass
class GuestConfig:
    """What the test guest should do, as a user states it."""

    ncpus: int = 1
    mode: Mode = Mode.WORK
    work: list[Work] = field(default_factory=list)
    flags: Flags = Flags.NONE
    monarch_timeout_us: int | None = None
    probes: list[Probe] = field(default_factory=list)

    def bootinfo(self, *, tsc_khz: int, mem_bytes: int) -> BootInfo:
        if not 1 <= self.ncpus <= MAX_CPUS:
            raise ValueError(f"the test guest supports 1..{MAX_CPUS} CPUs, not {self.ncpus}")
        if len(self.probes) > MAX_PROBES:
            raise ValueError(f"at most {MAX_PROBES} probes, not {len(self.probes)}")
        work = [int(w) for w in self.work] + [int(Work.KERNEL)] * (MAX_CPUS - len(self.work))
        probes = b"".join(p.pack() for p in self.probes)
        timeout = MONARCH_DEFAULT if self.monarch_timeout_us is None else self.monarch_timeout_us
        return BootInfo(
            ncpus=self.ncpus,
            flags=int(self.flags),
            mode=int(self.mode),
            monarch_timeout_us=timeout,
            tsc_khz=tsc_khz,
            mem_bytes=mem_bytes,
            work=bytes(work[:MAX_CPUS]),
            nprobes=len(self.probes),
            probes=probes.ljust(MAX_PROBES * Probe.size(), b"\0"),
        )

    @classmethod
    def from_bootinfo(cls, bi: BootInfo) -> GuestConfig:
        """The configuration a boot-info block was written from (e.g. read back from a
        restored guest's memory)."""
        if bi.magic != BOOTINFO_MAGIC or bi.version != BOOTINFO_VERSION:
            raise ValueError(f"no test guest boot info (magic {bi.magic:#x}, version {bi.version})")
        if not 1 <= bi.ncpus <= MAX_CPUS or bi.nprobes > MAX_PROBES:
            raise ValueError(f"boot info with {bi.ncpus} CPUs and {bi.nprobes} probes")
        probes = [Probe.unpack_from(bi.probes, i * Probe.size()) for i in range(bi.nprobes)]
        timeout = None if bi.monarch_timeout_us == MONARCH_DEFAULT else bi.monarch_timeout_us
        return cls(
            ncpus=bi.ncpus,
            mode=Mode(bi.mode),
            work=[Work(w) for w in bi.work[: bi.ncpus]],
            flags=Flags(bi.flags),
            monarch_timeout_us=timeout,
            probes=probes,
        )


class BuildError(RuntimeError):
    """The test guest could not be built; the message carries the compiler's words."""


def source_dir() -> Path:
    """Where the guest's sources are (``VMCE_TESTGUEST_SRC`` overrides)."""
    env = os.environ.get("VMCE_TESTGUEST_SRC")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "guests" / "testguest"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmce"


def _source_hash(src: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(src.iterdir()):
        if (f.is_file() and f.suffix in (".c", ".h", ".S", ".ld")) or f.name == "Makefile":
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def build(src: Path | None = None) -> Path:
    """The path of the built ELF, compiling it first if the cache has no build of these sources."""
    src = src or source_dir()
    if not (src / "Makefile").exists():
        raise BuildError(f"test guest sources not found at {src}")
    out = cache_dir() / f"testguest-{_source_hash(src)}"
    elf = out / "testguest.elf"
    if elf.exists():
        return elf
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="testguest-", dir=out.parent))
    try:
        r = subprocess.run(
            ["make", "-s", "-C", str(src), f"OUT={tmp}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            raise BuildError(f"building the test guest failed:\n{r.stdout}{r.stderr}")
        try:
            tmp.rename(out)
        except OSError:
            if not elf.exists():  # another process won the race only if it finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return elf


def image() -> ElfImage:
    """The built test guest, loaded."""
    return ElfImage.load(build())


def identify(vm: VmceVm) -> tuple[ElfImage, GuestConfig]:
    """The test guest build and configuration a (restored) VM runs; :class:`ValueError` if
    its memory does not hold this build of the test guest."""
    elf = image()
    mem = vm.machine.memory
    first = elf.segments[0]
    if mem.read(first.paddr, 64) != first.data[:64]:
        raise ValueError("the VM does not run this build of the test guest")
    bi = BootInfo.unpack_from(mem.read(BOOTINFO_GPA, BootInfo.size()))
    return elf, GuestConfig.from_bootinfo(bi)


#: Where the host writes the boot-info block, and the VMM's initial per-vCPU stacks.
BOOTINFO_GPA = 0x10000
BOOT_STACKS_GPA = 0x20000
BOOT_STACK_SIZE = 0x1000


class GuestTimeout(TimeoutError):
    """The guest did not report what was awaited; the message includes its last words."""


class TestGuest:
    """The test guest running in a :class:`~vmce.kvm.vmcevm.VmceVm`, with its event stream.

    Console lines are collected as they arrive; ``@vmce`` lines are parsed into events that
    tests and the demo wait for.
    """

    __test__ = False  # not a pytest class

    def __init__(
        self,
        config: GuestConfig,
        *,
        profile: HostProfile | None = None,
        policy: InjectionPolicy = InjectionPolicy.BROADCAST,
        memory_size: int = 64 << 20,
        cpu: CpuProfile | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self._init_console(on_line)
        self.elf = image()
        stacks = [BOOT_STACKS_GPA + (i + 1) * BOOT_STACK_SIZE for i in range(config.ncpus)]
        self.vm = VmceVm(
            VmceVmConfig(
                boot=DirectBoot(self.elf.entry, BOOTINFO_GPA, stacks),
                vcpus=config.ncpus,
                memory_size=memory_size,
                profile=profile or HostProfile.intel(),
                cpu=cpu,
                policy=policy,
                on_serial_line=self._line,
            )
        )
        try:
            self._load(memory_size)
        except BaseException:
            self.vm.close()
            raise

    def _init_console(self, on_line: Callable[[str], None] | None) -> None:
        self.lines: list[str] = []
        self.events: list[GuestEvent] = []
        self._cond = threading.Condition()
        self._on_line = on_line
        self.started_at = 0.0

    @classmethod
    def restore(
        cls,
        source: str | os.PathLike[str] | Snapshot,
        *,
        profile: HostProfile | None = None,
        cow: bool = False,
        on_line: Callable[[str], None] | None = None,
    ) -> TestGuest:
        """The test guest continued from a stream (:meth:`save`) or a :class:`Snapshot`
        (RAM copy-on-write from its file); ``cow`` maps a stream file the same way.

        Not started: :meth:`start` resumes the guest where it was saved. Console lines from
        before the save are not replayed; new ones arrive as usual.
        """
        g = cls.__new__(cls)
        g._init_console(on_line)
        if isinstance(source, Snapshot):
            g.vm = source.restore(on_serial_line=g._line)
        else:
            g.vm = restore_vm(source, profile=profile, cow=cow, on_serial_line=g._line)
        try:
            g.elf, g.config = identify(g.vm)
        except BaseException:
            g.vm.close()
            raise
        return g

    def save(
        self, path: str | os.PathLike[str], *, resume: bool = True, vmce_size: int = 32
    ) -> SaveReport:
        """Save the running guest (see :func:`vmce.kvm.persist.save_vm`)."""
        return save_vm(self.vm, path, resume=resume, vmce_size=vmce_size)

    def _load(self, memory_size: int) -> None:
        mem = self.vm.machine.memory
        for seg in self.elf.segments:
            mem.write(seg.paddr, seg.data)
        tsc_khz = self.vm.machine.vcpus[0].get_tsc_khz()
        mem.write(BOOTINFO_GPA, self.config.bootinfo(tsc_khz=tsc_khz, mem_bytes=memory_size).pack())

    def _line(self, line: str) -> None:
        now = time.monotonic()
        event = parse_event(line, now)
        with self._cond:
            self.lines.append(line)
            if event is not None:
                self.events.append(event)
            self._cond.notify_all()
        if self._on_line is not None:
            self._on_line(line)

    # -- running ------------------------------------------------------------------------------

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.vm.start()

    def wait_for(
        self,
        kind: str,
        match: Callable[[GuestEvent], bool] | None = None,
        *,
        timeout: float = 30.0,
        count: int = 1,
    ) -> list[GuestEvent]:
        """Wait until ``count`` events of ``kind`` (matching ``match``) have arrived."""
        deadline = time.monotonic() + timeout

        def found() -> list[GuestEvent]:
            return [e for e in self.events if e.kind == kind and (match is None or match(e))]

        with self._cond:
            while len(hits := found()) < count:
                left = deadline - time.monotonic()
                stopped = self.vm.machine.stop_reason
                if left <= 0 or stopped is not None:
                    why = f"the VM stopped: {stopped}" if stopped else f"{timeout} s passed"
                    tail = "\n".join(self.lines[-8:])
                    raise GuestTimeout(
                        f"waiting for {count} '{kind}' event(s), got {len(hits)}; {why}\n"
                        f"last console lines:\n{tail}"
                    )
                self._cond.wait(min(left, 0.05))
            return hits[:count]

    def boot(self, timeout: float = 60.0) -> GuestEvent:
        """Start the guest and wait until every CPU has initialised MCA."""
        self.start()
        return self.wait_for("ready", timeout=timeout)[0]

    def counter(self, cpu: int) -> int:
        """The work counter of ``cpu``, read from guest memory."""
        addr = self.elf.symbols["work_counter"] + 8 * cpu
        return int.from_bytes(self.vm.machine.memory.read(addr, 8), "little")

    def find(self, kind: str) -> list[GuestEvent]:
        with self._cond:
            return [e for e in self.events if e.kind == kind]

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def close(self) -> None:
        self.vm.close()

    def __enter__(self) -> TestGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
