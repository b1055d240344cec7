"""QEMU's human monitor (HMP) syntax for the commands vmce answers, and QEMU's ``mce``.

Parsing is pure (no VM): :func:`parse` turns a command line into an :class:`HmpMce`,
:class:`HmpInfo` or :class:`HmpSimple`; :func:`plan_mce` turns ``mce`` into the vMCE loads
QEMU's ``cpu_x86_inject_mce`` would make (kvm-linux.md 2.2-2.4):

* ``mce [-b] cpu bank status mcgstatus addr misc``; numbers are C literals (``0x..``, ``0..``
  octal, decimal), as QEMU's monitor reads them with base auto-detection.
* QEMU's checks, with QEMU's messages: ``CPU #n not found``, ``Invalid MCE bank number``
  (against QEMU's own 10 banks, so the usual ``mce 0 9 ...`` works), ``Invalid MCE status
  code`` (VAL clear), ``Guest CPU does not support MCA broadcast`` (``-b`` on an AMD guest, as
  current QEMU says).
* An uncorrected error raises #MC with the given MCG_STATUS; a corrected one only fills the
  bank (QEMU raises nothing for it) and leaves MCG_STATUS alone. The bank is merged with
  QEMU's rules (OVER when it still holds a valid error).
* ``-b`` gives every other vCPU QEMU's broadcast record: STATUS = VAL|UC, MCG_STATUS =
  MCIP|RIPV, ADDR = MISC = 0, raised as #MC.
* The monitor always passes MCE_INJECT_UNCOND_AO, so QEMU injects even into a vCPU whose
  MCG_STATUS.MCIP is still set, and then resets the guest ("Previous MCE still in progress,
  raising triple fault"). vmce refuses such an injection instead (nothing is loaded), so a
  monitor user cannot kill the guest by typing too fast.

Deliberate differences from QEMU, reported in the command's reply: the error lands in guest
bank 1 whatever bank the command names (the vMCE has two banks and reports every error in
bank 1), and MSCOD (STATUS bits 31:16) is masked as Xen's fill masks it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from vmce.mca.constants import (
    MCG_STATUS_MCIP,
    MCG_STATUS_RIPV,
    MCI_STATUS_MSCOD_FILTER,
    MCI_STATUS_UC,
    MCI_STATUS_VAL,
)
from vmce.vmce.direct import GUEST_ERROR_BANK, BankLoad, Merge

#: QEMU's default bank count (MCE_BANKS_DEF); ``mce`` checks the bank number against it.
QEMU_MCE_BANKS = 10
#: What QEMU writes into the other vCPUs on ``mce -b``.
BROADCAST_STATUS = MCI_STATUS_VAL | MCI_STATUS_UC
BROADCAST_MCG_STATUS = MCG_STATUS_MCIP | MCG_STATUS_RIPV

_C_INT = re.compile(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
U64 = (1 << 64) - 1
I32 = (1 << 31) - 1


class HmpError(ValueError):
    """A line the monitor refuses; ``str()`` is what the monitor prints."""


@dataclass(frozen=True)
class HmpMce:
    """``mce [-b] cpu bank status mcgstatus addr misc``."""

    broadcast: bool
    cpu: int
    bank: int
    status: int
    mcg_status: int
    addr: int
    misc: int


@dataclass(frozen=True)
class HmpInfo:
    """``info ITEM [-a]``."""

    item: str
    all_cpus: bool = False


@dataclass(frozen=True)
class HmpSimple:
    """A command without arguments: ``stop``, ``cont``, ``quit``, ``help``."""

    name: str


HmpCommand = HmpMce | HmpInfo | HmpSimple

#: Commands (with aliases) and their one-line help, in ``help`` order.
COMMANDS: dict[str, str] = {
    "mce": "mce [-b] cpu bank status mcgstatus addr misc -- inject a MCE on the given CPU "
    "[and broadcast to other CPUs with -b option]",
    "info": "info [subcommand] -- show various information about the system state",
    "stop": "stop -- stop emulation",
    "cont": "cont|c -- resume emulation",
    "quit": "quit|q -- quit the emulator",
    "help": "help|? [cmd] -- show the help",
}
ALIASES = {"c": "cont", "q": "quit", "?": "help"}
#: ``info`` items and their help.
INFO_ITEMS: dict[str, str] = {
    "registers": "info registers [-a] -- show the cpu registers (-a: all CPUs)",
    "cpus": "info cpus -- show infos for each CPU",
    "status": "info status -- show the current VM status (running|paused)",
    "mce": "info mce -- show each vCPU's vMCE state (vmce)",
    "version": "info version -- show the version of vmce",
}
_MCE_ARGS = ("cpu", "bank", "status", "mcgstatus", "addr", "misc")


def parse_number(text: str, what: str, limit: int = U64) -> int:
    """A C integer literal (base auto-detected) no larger than ``limit``."""
    t = text.strip()
    if not _C_INT.fullmatch(t):
        raise HmpError(f"invalid {what} '{text}': expected a number (0x1f, 017, 42)")
    value = int(t, 16) if t[:2].lower() == "0x" else int(t, 8) if t[0] == "0" else int(t)
    if value > limit:
        raise HmpError(f"{what} '{text}' is too large (at most {limit:#x})")
    return value


def parse(line: str) -> HmpCommand:
    """One monitor line as a command; raises :class:`HmpError` with the monitor's words."""
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise HmpError(f"cannot parse '{line}': {e}") from None
    if not words:
        raise HmpError("empty command line")
    name = ALIASES.get(words[0], words[0])
    args = words[1:]
    if name == "mce":
        return _parse_mce(args)
    if name == "info":
        return _parse_info(args)
    if name in COMMANDS:
        if args and name != "help":
            raise HmpError(f"{name}: too many arguments")
        return HmpSimple(name if name != "help" or not args else f"help {args[0]}")
    raise HmpError(f"unknown command: '{words[0]}'")


def _parse_mce(args: list[str]) -> HmpMce:
    broadcast = False
    if args and args[0] == "-b":
        broadcast, args = True, args[1:]
    if args and args[0].startswith("-") and not args[0][1:].isdigit():
        raise HmpError(f"mce: unsupported option '{args[0]}' (only -b)")
    if len(args) < len(_MCE_ARGS):
        raise HmpError(f"mce: missing argument '{_MCE_ARGS[len(args)]}'")
    if len(args) > len(_MCE_ARGS):
        raise HmpError("mce: too many arguments")
    cpu = parse_number(args[0], "cpu", I32)
    bank = parse_number(args[1], "bank", I32)
    status, mcg, addr, misc = (
        parse_number(a, n) for a, n in zip(args[2:], _MCE_ARGS[2:], strict=True)
    )
    return HmpMce(broadcast, cpu, bank, status, mcg, addr, misc)


def _parse_info(args: list[str]) -> HmpInfo:
    if not args:
        raise HmpError("info: missing subcommand (" + ", ".join(INFO_ITEMS) + ")")
    item, rest = args[0], args[1:]
    if item not in INFO_ITEMS:
        raise HmpError(f"info: unknown subcommand '{item}'")
    all_cpus = False
    if item == "registers" and rest == ["-a"]:
        all_cpus, rest = True, []
    if rest:
        raise HmpError(f"info {item}: too many arguments")
    return HmpInfo(item, all_cpus)


def help_text(topic: str | None = None) -> str:
    """``help`` / ``help CMD`` output."""
    if topic is not None:
        name = ALIASES.get(topic, topic)
        if name == "info":
            return "\n".join(INFO_ITEMS.values()) + "\n"
        if name in COMMANDS:
            return COMMANDS[name] + "\n"
        raise HmpError(f"unknown command: '{topic}'")
    return "\n".join(COMMANDS.values()) + "\n"


@dataclass(frozen=True)
class McePlan:
    """What ``mce`` loads into which vCPUs, plus the notes vmce adds to the reply."""

    loads: tuple[BankLoad, ...]
    notes: tuple[str, ...]
    uncorrected: bool


def plan_mce(cmd: HmpMce, nr_vcpus: int, *, broadcast_supported: bool = True) -> McePlan:
    """The vMCE loads of ``cmd`` with QEMU's checks and semantics (module docstring)."""
    if not 0 <= cmd.cpu < nr_vcpus:
        raise HmpError(f"CPU #{cmd.cpu} not found")
    if cmd.bank >= QEMU_MCE_BANKS:
        raise HmpError("Invalid MCE bank number")
    if not cmd.status & MCI_STATUS_VAL:
        raise HmpError("Invalid MCE status code")
    if cmd.broadcast and not broadcast_supported:
        raise HmpError("Guest CPU does not support MCA broadcast")
    uc = bool(cmd.status & MCI_STATUS_UC)
    loads = [
        BankLoad(
            cmd.cpu,
            cmd.status,
            cmd.addr,
            cmd.misc,
            cmd.mcg_status if uc else None,
            raise_mc=uc,
            merge=Merge.QEMU,
        )
    ]
    if cmd.broadcast:
        loads += [
            BankLoad(v, BROADCAST_STATUS, 0, 0, BROADCAST_MCG_STATUS, True, Merge.QEMU)
            for v in range(nr_vcpus)
            if v != cmd.cpu
        ]
    notes: list[str] = []
    if cmd.bank != GUEST_ERROR_BANK:
        notes.append(
            f"bank {cmd.bank} is reported in guest bank {GUEST_ERROR_BANK} "
            "(the vMCE has 2 banks and reports every error in bank 1)"
        )
    if cmd.status & ~MCI_STATUS_MSCOD_FILTER:
        notes.append(
            f"MSCOD masked: the guest reads status {cmd.status & MCI_STATUS_MSCOD_FILTER:#x}"
        )
    if not uc:
        notes.append("corrected error: bank filled, no #MC (the guest sees it when it polls)")
    return McePlan(tuple(loads), tuple(notes), uc)
