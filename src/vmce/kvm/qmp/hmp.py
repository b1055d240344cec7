"""``human-monitor-command``: QEMU's HMP lines, answered with HMP's text.

The line is parsed by :mod:`vmce.host.hmp`; ``mce`` becomes the vMCE loads QEMU's
``cpu_x86_inject_mce`` would make, applied all or nothing through the controller. As in QEMU,
the command itself succeeds and the monitor's text says what happened; a refused line reads
``Error: ...`` (the prefix QEMU's ``hmp_handle_error`` uses), with QEMU's own message where
QEMU has one (``Error: Invalid MCE bank number``). A successful ``mce`` prints nothing unless
vmce has something to add (bank and MSCOD mapping), on lines starting ``vmce:``.
"""

from __future__ import annotations

from vmce import __version__
from vmce.host.hmp import (
    HmpError,
    HmpInfo,
    HmpMce,
    HmpSimple,
    help_text,
    parse,
    plan_mce,
)
from vmce.kvm.qmp import events as ev
from vmce.kvm.qmp.commands import Controller
from vmce.kvm.qmp.protocol import QmpError
from vmce.kvm.vcpu import Vcpu

REGISTER_TIMEOUT = 2.0
_FLAGS = ((11, "O"), (10, "D"), (7, "S"), (6, "Z"), (4, "A"), (2, "P"), (0, "C"))


def run_hmp(c: Controller, line: str, cpu_index: int = 0) -> str:
    """The monitor's output for ``line`` (never raises for a bad line: HMP prints errors)."""
    try:
        cmd = parse(line)
        if isinstance(cmd, HmpMce):
            return _mce(c, cmd)
        if isinstance(cmd, HmpInfo):
            return _info(c, cmd, cpu_index)
        return _simple(c, cmd)
    except (HmpError, QmpError) as e:
        return f"Error: {e}\n"


def _mce(c: Controller, cmd: HmpMce) -> str:
    plan = plan_mce(cmd, c.nr_vcpus, broadcast_supported=c.broadcast_supported())
    c.apply_loads(plan.loads, "hmp")
    if plan.uncorrected:
        c.emit(ev.MEMORY_FAILURE, ev.memory_failure(cmd.status))
    return "".join(f"vmce: {n}\n" for n in plan.notes)


def _simple(c: Controller, cmd: HmpSimple) -> str:
    if cmd.name == "stop":
        c.stop()
    elif cmd.name == "cont":
        c.cont()
    elif cmd.name == "quit":
        c.on_quit()
    elif cmd.name.startswith("help"):
        topic = cmd.name[5:] or None
        return help_text(topic)
    return ""


def _info(c: Controller, cmd: HmpInfo, cpu_index: int) -> str:
    if cmd.item == "status":
        state = c.run_state()
        return f"VM status: {state}\n"
    if cmd.item == "version":
        return f"{__version__} (vmce)\n"
    if cmd.item == "cpus":
        out = []
        for i, runner in enumerate(c.vm.machine.runners):
            thread = getattr(runner, "_thread", None)
            tid = getattr(thread, "native_id", None) or 0
            mark = "*" if i == cpu_index else " "
            out.append(f"{mark} CPU #{i}: thread_id={tid}\n")
        return "".join(out)
    if cmd.item == "mce":
        return _info_mce(c)
    ids = range(c.nr_vcpus) if cmd.all_cpus else [cpu_index]
    if not 0 <= cpu_index < c.nr_vcpus:
        raise HmpError(f"CPU #{cpu_index} not found")
    return "".join(_registers(c, i, cmd.all_cpus) for i in ids)


def _info_mce(c: Controller) -> str:
    lines = []
    for s in c.vm.domain.snapshot():
        b = s.banks[1]
        lines.append(
            f"CPU #{s.vcpu_id}: MCG_CAP={s.mcg_cap:#x} MCG_STATUS={s.mcg_status:#x} "
            f"MCG_EXT_CTL={s.mcg_ext_ctl:#x} pending={int(s.mce_pending)}\n"
            f"  MC1_STATUS={b.status:#018x} MC1_ADDR={b.addr:#018x} MC1_MISC={b.misc:#x} "
            f"MC0_CTL2={s.banks[0].ctl2:#x} MC1_CTL2={b.ctl2:#x}\n"
        )
    return "".join(lines)


def _registers(c: Controller, vid: int, header: bool) -> str:
    """QEMU's ``info registers`` layout (general, segment and control registers), plus the
    vCPU's vMCE registers."""
    if c.vm.machine.stop_reason is not None:
        raise HmpError("the VM has stopped; its vCPUs are gone")

    def read(vcpu: Vcpu) -> str:
        r = vcpu.get_regs()
        s = vcpu.get_sregs()
        flags = "".join(ch if r.rflags >> bit & 1 else "-" for bit, ch in _FLAGS)
        lines = [
            f"RAX={r.rax:016x} RBX={r.rbx:016x} RCX={r.rcx:016x} RDX={r.rdx:016x}",
            f"RSI={r.rsi:016x} RDI={r.rdi:016x} RBP={r.rbp:016x} RSP={r.rsp:016x}",
            f"R8 ={r.r8:016x} R9 ={r.r9:016x} R10={r.r10:016x} R11={r.r11:016x}",
            f"R12={r.r12:016x} R13={r.r13:016x} R14={r.r14:016x} R15={r.r15:016x}",
            f"RIP={r.rip:016x} RFL={r.rflags:08x} [{flags}] CPL={s.cs.selector & 3}",
        ]
        for name in ("es", "cs", "ss", "ds", "fs", "gs"):
            seg = getattr(s, name)
            lines.append(
                f"{name.upper()} ={seg.selector:04x} {seg.base:016x} {seg.limit:08x} "
                f"dpl={seg.dpl} type={seg.type:x}"
            )
        lines += [
            f"GDT=     {s.gdt.base:016x} {s.gdt.limit:08x}",
            f"IDT=     {s.idt.base:016x} {s.idt.limit:08x}",
            f"CR0={s.cr0:08x} CR2={s.cr2:016x} CR3={s.cr3:016x} CR4={s.cr4:08x}",
            f"EFER={s.efer:016x}",
        ]
        return "\n".join(lines) + "\n"

    try:
        text = c.vm.machine.submit(vid, read).result(REGISTER_TIMEOUT)
    except TimeoutError:
        raise HmpError(f"CPU #{vid} did not answer within {REGISTER_TIMEOUT} s") from None
    except RuntimeError as e:
        raise HmpError(str(e)) from None
    v = c.vm.domain.vcpus[vid]
    b = v.banks[1]
    mce = (
        f"MCG_CAP={v.mcg_cap:016x} MCG_STATUS={v.mcg_status:016x} "
        f"MC1_STATUS={b.status:016x} MC1_ADDR={b.addr:016x} MC1_MISC={b.misc:016x}\n"
    )
    head = f"CPU#{vid}\n" if header else ""
    return head + text + mce
