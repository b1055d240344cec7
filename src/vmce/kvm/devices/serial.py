"""A 16550A UART (COM1: ports 0x3f8-0x3ff, IRQ 4), after kvm-linux.md section 4.5.

Enough for Linux's 8250 driver: LSR always shows THRE|TEMT, IER/LCR/MCR/SCR read back, FCR
selects FIFO mode (IIR bits 7:6 = 11 means 16550A), loopback mode for the MSR/RX path, and a
THRI interrupt whenever THRI is enabled and the transmitter is empty. Output is collected
into lines and handed to a callback.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, IntFlag

COM1_BASE = 0x3F8
COM1_IRQ = 4
PORT_COUNT = 8


class Reg(IntEnum):
    """Register offsets from the base port."""

    DATA = 0  # RBR / THR (DLL with DLAB)
    IER = 1  # (DLM with DLAB)
    IIR_FCR = 2
    LCR = 3
    MCR = 4
    LSR = 5
    MSR = 6
    SCR = 7


class Ier(IntFlag):
    """Interrupt enable bits."""

    RDI = 0x01
    THRI = 0x02


class Iir(IntEnum):
    """Interrupt identification values (low nibble)."""

    NO_INT = 0x01
    THRI = 0x02
    RDI = 0x04


IIR_FIFO_16550A = 0xC0
LCR_DLAB = 0x80
MCR_LOOP = 0x10
FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02


class Lsr(IntFlag):
    """Line status bits."""

    DR = 0x01
    THRE = 0x20
    TEMT = 0x40


@dataclass(frozen=True)
class SerialState:
    """Everything a saved VM needs to continue the UART where it was (:mod:`vmce.kvm.persist`).

    ``rx`` holds received bytes the guest has not read yet; ``pending`` the bytes written
    since the last newline, so that a line cut by a save is completed after the restore.
    """

    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    scr: int = 0
    dll: int = 0x0C
    dlm: int = 0
    fifo: bool = False
    thri_pending: bool = False
    rx: bytes = b""
    pending: bytes = b""


class Serial16550:
    """The UART model. ``raise_irq`` pulses its interrupt line (None: polled only)."""

    def __init__(
        self,
        on_line: Callable[[str], None] | None = None,
        raise_irq: Callable[[], None] | None = None,
    ) -> None:
        self._on_line = on_line
        self._raise_irq = raise_irq
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._rx: deque[int] = deque()
        self.lines: list[str] = []
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.dll = 0x0C
        self.dlm = 0
        self.fifo = False
        self._thri_pending = False

    def _interrupt_locked(self) -> int:
        if self._rx and self.ier & Ier.RDI:
            return Iir.RDI
        if self._thri_pending and self.ier & Ier.THRI:
            return Iir.THRI
        return Iir.NO_INT

    def _fire(self, should: bool) -> None:
        if should and self._raise_irq is not None:
            self._raise_irq()

    def io_read(self, vcpu_id: int, offset: int, size: int) -> int:
        """Register read."""
        with self._lock:
            if offset == Reg.DATA:
                if self.lcr & LCR_DLAB:
                    return self.dll
                return self._rx.popleft() if self._rx else 0
            if offset == Reg.IER:
                return self.dlm if self.lcr & LCR_DLAB else self.ier
            if offset == Reg.IIR_FCR:
                iir = self._interrupt_locked()
                if iir == Iir.THRI:
                    self._thri_pending = False
                return iir | (IIR_FIFO_16550A if self.fifo else 0)
            if offset == Reg.LCR:
                return self.lcr
            if offset == Reg.MCR:
                return self.mcr
            if offset == Reg.LSR:
                return Lsr.THRE | Lsr.TEMT | (Lsr.DR if self._rx else 0)
            if offset == Reg.MSR:
                return self._modem_status_locked()
            return self.scr

    def _modem_status_locked(self) -> int:
        if self.mcr & MCR_LOOP:
            m = self.mcr
            # Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
            return (m & 1) << 5 | (m & 2) << 3 | (m & 4) << 4 | (m & 8) << 4
        return 0xB0  # DCD | DSR | CTS

    def io_write(self, vcpu_id: int, offset: int, size: int, value: int) -> None:
        """Register write."""
        value &= 0xFF
        fire = False
        line: str | None = None
        with self._lock:
            if offset == Reg.DATA:
                if self.lcr & LCR_DLAB:
                    self.dll = value
                else:
                    line = self._transmit_locked(value)
                    self._thri_pending = True
                    fire = bool(self.ier & Ier.THRI) or bool(self._rx and self.ier & Ier.RDI)
            elif offset == Reg.IER:
                if self.lcr & LCR_DLAB:
                    self.dlm = value
                else:
                    newly = value & Ier.THRI and not self.ier & Ier.THRI
                    self.ier = value & 0x0F
                    if newly:
                        self._thri_pending = True
                    fire = self._interrupt_locked() != Iir.NO_INT
            elif offset == Reg.IIR_FCR:
                self.fifo = bool(value & FCR_ENABLE_FIFO)
                if value & FCR_CLEAR_RCVR:
                    self._rx.clear()
            elif offset == Reg.LCR:
                self.lcr = value
            elif offset == Reg.MCR:
                self.mcr = value & 0x1F
            elif offset == Reg.SCR:
                self.scr = value
        self._fire(fire)
        if line is not None and self._on_line is not None:
            self._on_line(line)

    def _transmit_locked(self, byte: int) -> str | None:
        if self.mcr & MCR_LOOP:
            self._rx.append(byte)
            return None
        if byte == 0x0A:
            line = self._pending.decode("utf-8", "replace").rstrip("\r")
            self._pending.clear()
            self.lines.append(line)
            return line
        self._pending.append(byte)
        return None

    def feed(self, data: bytes) -> None:
        """Bytes typed on the console (received by the guest)."""
        with self._lock:
            self._rx.extend(data)
            fire = bool(self.ier & Ier.RDI)
        self._fire(fire)

    def flush(self) -> str:
        """Text written since the last newline (and forget it)."""
        with self._lock:
            text = self._pending.decode("utf-8", "replace")
            self._pending.clear()
            return text

    def save_state(self) -> SerialState:
        """The register and buffer state (not the line history), for saving the VM."""
        with self._lock:
            return SerialState(
                self.ier,
                self.lcr,
                self.mcr,
                self.scr,
                self.dll,
                self.dlm,
                self.fifo,
                self._thri_pending,
                bytes(self._rx),
                bytes(self._pending),
            )

    def load_state(self, state: SerialState) -> None:
        """Continue from a saved state (before the vCPUs run); the line history is kept."""
        with self._lock:
            self.ier, self.lcr, self.mcr, self.scr = state.ier, state.lcr, state.mcr, state.scr
            self.dll, self.dlm, self.fifo = state.dll, state.dlm, state.fifo
            self._thri_pending = state.thri_pending
            self._rx = deque(state.rx)
            self._pending = bytearray(state.pending)
