"""Which records an x86 HVM stream may hold, how often, in which order: one table, one checker.

:class:`RecordSequence` is shared by the writer (so vmce never writes what it would refuse) and
the reader. The rules are those of the stream spec and libxc's C restorer, a little stricter:

* known types not meaningful for an HVM restore without checkpoints are refused (PV records,
  TOOLSTACK, VERIFY, CHECKPOINT*), as libxc's HVM restorer does for the PV ones;
* unknown mandatory types (0x13-0x7FFFFFFF) are refused, optional ones (bit 31) are skipped;
* STATIC_DATA_END and the CPUID/MSR policies only in version 3; the policies before
  STATIC_DATA_END, memory and register content (PAGE_DATA, X86_TSC_INFO, HVM_PARAMS,
  HVM_CONTEXT) after it (libxc silently ignores policies that come later: vmce refuses them);
* X86_TSC_INFO, HVM_PARAMS, HVM_CONTEXT, STATIC_DATA_END and the policies at most once
  (checkpointed streams, which repeat them, are refused anyway);
* HVM_PARAMS must precede HVM_CONTEXT (the spec). Xen's libxc saver writes them the other way
  round and its restorer copes (it applies the context last in any case), so a reader can opt
  into accepting that order;
* END requires HVM_CONTEXT (and, in v3, STATIC_DATA_END) and ends the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmce.save.stream.format import RecordError, RecordType, TscInfo, is_optional, record_name


@dataclass(frozen=True)
class RecordRule:
    """What the reader accepts of one record type.

    ``refused`` is the reason a known type is not accepted at all; ``fixed_length`` the exact
    body length of fixed-size types; ``once`` means at most one per stream; ``v3_only`` refused
    in a version-2 stream; ``static`` before STATIC_DATA_END, ``dynamic`` after it (v3).
    """

    refused: str = ""
    fixed_length: int | None = None
    once: bool = False
    v3_only: bool = False
    static: bool = False
    dynamic: bool = False


_PV_ONLY = "an x86 PV record, not valid in an x86 HVM stream"

RULES: dict[RecordType, RecordRule] = {
    RecordType.END: RecordRule(fixed_length=0),
    RecordType.PAGE_DATA: RecordRule(dynamic=True),
    RecordType.X86_PV_INFO: RecordRule(refused=_PV_ONLY),
    RecordType.X86_PV_P2M_FRAMES: RecordRule(refused=_PV_ONLY),
    RecordType.X86_PV_VCPU_BASIC: RecordRule(refused=_PV_ONLY),
    RecordType.X86_PV_VCPU_EXTENDED: RecordRule(refused=_PV_ONLY),
    RecordType.X86_PV_VCPU_XSAVE: RecordRule(refused=_PV_ONLY),
    RecordType.SHARED_INFO: RecordRule(refused=_PV_ONLY),
    RecordType.X86_TSC_INFO: RecordRule(fixed_length=TscInfo.size(), once=True, dynamic=True),
    RecordType.HVM_CONTEXT: RecordRule(once=True, dynamic=True),
    RecordType.HVM_PARAMS: RecordRule(once=True, dynamic=True),
    RecordType.TOOLSTACK: RecordRule(refused="the deprecated TOOLSTACK record"),
    RecordType.X86_PV_VCPU_MSRS: RecordRule(refused=_PV_ONLY),
    RecordType.VERIFY: RecordRule(refused="VERIFY (a debug re-send of memory), not supported"),
    RecordType.CHECKPOINT: RecordRule(refused="a checkpointed (Remus/COLO) stream, not supported"),
    RecordType.CHECKPOINT_DIRTY_PFN_LIST: RecordRule(
        refused="CHECKPOINT_DIRTY_PFN_LIST, which belongs to the COLO back channel"
    ),
    RecordType.STATIC_DATA_END: RecordRule(fixed_length=0, once=True, v3_only=True),
    RecordType.X86_CPUID_POLICY: RecordRule(once=True, v3_only=True, static=True),
    RecordType.X86_MSR_POLICY: RecordRule(once=True, v3_only=True, static=True),
}


def fixed_length(rtype: int) -> int | None:
    """The exact body length of a fixed-size known type, else ``None``."""
    try:
        return RULES[RecordType(rtype)].fixed_length
    except ValueError:
        return None


#: The note recorded for a skipped optional record.
OPTIONAL_SKIPPED = "optional record skipped"


class RecordSequence:
    """The order state of one stream: feed it each record type with :meth:`admit`."""

    def __init__(self, version: int, *, allow_context_before_params: bool = False) -> None:
        self.version = version
        self.allow_context_before_params = allow_context_before_params
        self.seen: set[RecordType] = set()
        self.ended = False

    def admit(self, rtype: int) -> RecordRule | None:
        """Accept the next record's type or raise :class:`RecordError`.

        Returns the type's rule, or ``None`` for an optional record of unknown type, which
        the caller skips.
        """
        if self.ended:
            raise RecordError("record after END")
        try:
            known = RecordType(rtype)
        except ValueError:
            if is_optional(rtype):
                return None
            raise RecordError(f"unknown mandatory record type {rtype:#x}") from None
        rule = RULES[known]
        self._check(known, rule)
        self.seen.add(known)
        self.ended = known == RecordType.END
        return rule

    def _check(self, rtype: RecordType, rule: RecordRule) -> None:
        name = record_name(rtype)
        if rule.refused:
            raise RecordError(f"{name}: {rule.refused}")
        if rule.v3_only and self.version < 3:
            raise RecordError(f"{name} in a version {self.version} stream (version 3 only)")
        if rule.once and rtype in self.seen:
            raise RecordError(f"duplicate {name} record")
        static_done = RecordType.STATIC_DATA_END in self.seen
        if rule.static and static_done:
            raise RecordError(f"{name} after STATIC_DATA_END")
        if rule.dynamic and self.version >= 3 and not static_done:
            raise RecordError(f"{name} before STATIC_DATA_END")
        if (
            rtype == RecordType.HVM_PARAMS
            and RecordType.HVM_CONTEXT in self.seen
            and not self.allow_context_before_params
        ):
            raise RecordError(
                "HVM_PARAMS after HVM_CONTEXT: the stream spec requires HVM_PARAMS first "
                "(libxc's own saver writes them the other way round; a reader may opt in)"
            )
        if rtype == RecordType.END:
            self._check_end()

    def _check_end(self) -> None:
        if self.version >= 3 and RecordType.STATIC_DATA_END not in self.seen:
            raise RecordError("END without STATIC_DATA_END in a version 3 stream")
        if RecordType.HVM_CONTEXT not in self.seen:
            raise RecordError("END without an HVM_CONTEXT record")
