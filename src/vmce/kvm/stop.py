"""Why a VM stopped, in words a user understands."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class StopKind(Enum):
    """The broad class of a stop."""

    GUEST_EXIT = "the guest wrote its exit code to the debug-exit port"
    SHUTDOWN = "the vCPU shut down (triple fault)"
    SHUTDOWN_REQUESTED = "the VMM requested a shutdown"
    SYSTEM_EVENT = "the guest requested a power-off, reset or crash stop"
    EMULATION_FAILURE = "KVM's instruction emulator could not run a guest instruction"
    INTERNAL_ERROR = "KVM reported an internal error"
    FAIL_ENTRY = "KVM could not enter the guest"
    UNHANDLED_EXIT = "KVM returned an exit this VMM does not handle"
    VMM_ERROR = "the VMM itself failed while handling an exit"
    HOST_STOP = "the host stopped the VM"
    TIMEOUT = "the VM ran out of time"


@dataclass(frozen=True)
class StopReason:
    """The first reason the VM stopped; ``message`` is the sentence to show a user."""

    kind: StopKind
    message: str
    vcpu_id: int | None = None
    exit_code: int | None = None
    rip: int | None = None

    def __str__(self) -> str:
        return self.message
