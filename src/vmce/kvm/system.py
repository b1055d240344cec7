"""/dev/kvm: the API version, capabilities and what the host supports."""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from types import TracebackType

from vmce.kvm.abi import Cap, FlexBuffer, Ioctl, KvmCpuid2, KvmCpuidEntry2, KvmMsrList
from vmce.kvm.abi.constants import KVM_API_VERSION
from vmce.kvm.fdio import KvmError, ioctl, ioctl_buf
from vmce.kvm.x86.cpuid import CpuidEntry

DEFAULT_DEVICE = "/dev/kvm"


@dataclass(frozen=True)
class KvmAvailability:
    """Whether /dev/kvm can run guests here, and if not, why (for skips and error messages)."""

    usable: bool
    reason: str


class Kvm:
    """An open /dev/kvm (the system fd)."""

    def __init__(self, path: str = DEFAULT_DEVICE) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            version = self.api_version()
            if version != KVM_API_VERSION:
                raise KvmError(errno.ENOTSUP, f"{path}: KVM API version {version}, need 12")
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def fd(self) -> int:
        """The raw file descriptor (valid until :meth:`close`)."""
        if self._fd < 0:
            raise ValueError("Kvm is closed")
        return self._fd

    def api_version(self) -> int:
        """``KVM_GET_API_VERSION`` (always 12)."""
        return ioctl(self.fd, Ioctl.GET_API_VERSION)

    def check_extension(self, cap: Cap) -> int:
        """``KVM_CHECK_EXTENSION`` on /dev/kvm: 0 when absent, else 1 or a cap-specific value."""
        return ioctl(self.fd, Ioctl.CHECK_EXTENSION, int(cap))

    def vcpu_mmap_size(self) -> int:
        """Size of the kvm_run mapping of each vCPU fd."""
        return ioctl(self.fd, Ioctl.GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self, max_entries: int = 256) -> list[CpuidEntry]:
        """``KVM_GET_SUPPORTED_CPUID``; grows the buffer on E2BIG."""
        while True:
            buf = FlexBuffer(KvmCpuid2, KvmCpuidEntry2, "entries", max_entries)
            buf.header.nent = max_entries
            try:
                ioctl_buf(self.fd, Ioctl.GET_SUPPORTED_CPUID, buf.buffer)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and max_entries < 4096:
                    max_entries *= 2
                    continue
                raise
            return [CpuidEntry.from_kvm(buf.entries[i]) for i in range(int(buf.header.nent))]

    def mce_cap_supported(self) -> int:
        """``KVM_X86_GET_MCE_CAP_SUPPORTED``: MCG_CAP bits KVM's own MCA emulation can offer."""
        value = ctypes.c_uint64()
        ioctl_buf(self.fd, Ioctl.X86_GET_MCE_CAP_SUPPORTED, value)
        return int(value.value)

    def msr_index_list(self, max_entries: int = 1024) -> list[int]:
        """``KVM_GET_MSR_INDEX_LIST``: the MSRs KVM saves and restores."""
        buf = FlexBuffer(KvmMsrList, ctypes.c_uint32, "indices", max_entries)
        buf.header.nmsrs = max_entries
        ioctl_buf(self.fd, Ioctl.GET_MSR_INDEX_LIST, buf.buffer)
        return [int(buf.entries[i]) for i in range(int(buf.header.nmsrs))]

    def close(self) -> None:
        """Close the fd (idempotent). VMs created from it stay valid."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def probe(path: str = DEFAULT_DEVICE) -> KvmAvailability:
    """Check that ``path`` opens, speaks API 12 and has the caps this VMM relies on."""
    if not os.path.exists(path):
        return KvmAvailability(False, f"{path} does not exist")
    try:
        with Kvm(path) as kvm:
            missing = [
                cap.name
                for cap in (Cap.USER_MEMORY, Cap.VCPU_EVENTS, Cap.IMMEDIATE_EXIT, Cap.MP_STATE)
                if kvm.check_extension(cap) <= 0
            ]
    except OSError as exc:
        return KvmAvailability(False, f"cannot use {path}: {exc}")
    if missing:
        return KvmAvailability(False, f"{path} lacks {', '.join(missing)}")
    return KvmAvailability(True, f"{path} usable")
