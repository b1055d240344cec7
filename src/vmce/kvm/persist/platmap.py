"""The VM-wide devices between KVM's in-kernel state and Xen's HVM save records, both ways.

PIC (``hvm_hw_vpic``, two instances), IOAPIC (``hvm_hw_vioapic``) and PIT (``hvm_hw_pit``)
carry every value Xen has a field for; KVM's extra fields (the PICs' ``last_irr`` and
``elcr_mask``, the IOAPIC's ``irr``, the PIT's load times and flags) and kvmclock travel in the
KVM_PLATFORM vendor entry. Xen's ``int_output`` has no KVM field: it is derived on save as
KVM's ``pic_get_irq`` would see it, and ignored on restore (KVM recomputes its output).
"""

from __future__ import annotations

from dataclasses import dataclass

from vmce.kvm.abi import (
    KvmClockData,
    KvmIoapicState,
    KvmPicState,
    KvmPitChannelState,
    KvmPitState2,
    PitFlag,
)
from vmce.kvm.abi.constants import KVM_IOAPIC_NUM_PINS
from vmce.kvm.persist.vendor import KvmPlatformEntry
from vmce.kvm.vstate import PlatformState
from vmce.save.hvmrecords import VIOAPIC_NUM_PINS, Ioapic, Pic, PicMode, Pit, PitChannel

#: A redirection entry with the mask bit set: what Xen's IOAPIC pins beyond KVM's 24 hold.
IOAPIC_MASKED = 1 << 16
U64 = (1 << 64) - 1
_PIC_MODE_FIELDS: tuple[tuple[str, PicMode], ...] = (
    ("read_reg_select", PicMode.READSEL_ISR),
    ("poll", PicMode.POLL),
    ("auto_eoi", PicMode.AUTO_EOI),
    ("rotate_on_auto_eoi", PicMode.ROTATE_ON_AUTO_EOI),
    ("special_fully_nested_mode", PicMode.SPECIAL_FULLY_NESTED_MODE),
    ("special_mask", PicMode.SPECIAL_MASK_MODE),
)
#: The PIT channel fields KVM and Xen both have (they name them alike), in KVM's order.
_PIT_FIELDS = tuple(
    name for name, *_ in KvmPitChannelState._fields_ if name in PitChannel.field_names()
)


class PlatformMapError(ValueError):
    """Xen records this VMM's in-kernel devices cannot hold."""


def _priority(mask: int, priority_add: int) -> int:
    """Steps from the highest priority to the first set bit of ``mask`` (8: none)."""
    for step in range(8):
        if mask >> ((step + priority_add) & 7) & 1:
            return step
    return 8


def pic_output(pic: KvmPicState, *, master: bool) -> int:
    """Whether the 8259's INT line is up: a request above the highest in-service level."""
    pending = int(pic.irr) & ~int(pic.imr) & 0xFF
    if not pending:
        return 0
    in_service = int(pic.isr)
    if pic.special_mask:
        in_service &= ~int(pic.imr)
    if master and pic.special_fully_nested_mode:
        in_service &= ~(1 << 2)
    add = int(pic.priority_add)
    return int(_priority(pending, add) < _priority(in_service, add))


def pic_record(pic: KvmPicState, *, master: bool) -> Pic:
    mode = PicMode.IS_MASTER if master else PicMode(0)
    for name, bit in _PIC_MODE_FIELDS:
        if getattr(pic, name):
            mode |= bit
    init_state = (int(pic.init_state) & 3) | (int(bool(pic.init4)) << 2)
    return Pic(
        irr=int(pic.irr),
        imr=int(pic.imr),
        isr=int(pic.isr),
        irq_base=int(pic.irq_base),
        init_priority=Pic.make_init_priority(init_state, int(pic.priority_add) & 0xF),
        mode_bits=int(mode),
        elcr=int(pic.elcr),
        int_output=pic_output(pic, master=master),
    )


def pic_state(rec: Pic, last_irr: int, elcr_mask: int) -> KvmPicState:
    out = KvmPicState()
    out.irr, out.imr, out.isr, out.irq_base = rec.irr, rec.imr, rec.isr, rec.irq_base
    out.init_state = rec.init_state & 3
    out.init4 = (rec.init_state >> 2) & 1
    out.priority_add = rec.priority_add & 7
    for name, bit in _PIC_MODE_FIELDS:
        setattr(out, name, int(bool(rec.mode & bit)))
    out.elcr, out.last_irr, out.elcr_mask = rec.elcr, last_irr, elcr_mask
    return out


def ioapic_record(io: KvmIoapicState) -> Ioapic:
    entries = [int(io.redirtbl[i]) for i in range(KVM_IOAPIC_NUM_PINS)]
    entries += [IOAPIC_MASKED] * (VIOAPIC_NUM_PINS - KVM_IOAPIC_NUM_PINS)
    return Ioapic.build(
        entries, base_address=int(io.base_address), ioregsel=int(io.ioregsel), id=int(io.id)
    )


def ioapic_state(rec: Ioapic, irr: int) -> KvmIoapicState:
    entries = rec.entries
    for pin in range(KVM_IOAPIC_NUM_PINS, VIOAPIC_NUM_PINS):
        if not entries[pin] & IOAPIC_MASKED:
            raise PlatformMapError(
                f"IOAPIC pin {pin} is not masked, but KVM's IOAPIC has {KVM_IOAPIC_NUM_PINS} pins"
            )
    out = KvmIoapicState()
    out.base_address, out.ioregsel, out.id, out.irr = rec.base_address, rec.ioregsel, rec.id, irr
    for pin in range(KVM_IOAPIC_NUM_PINS):
        out.redirtbl[pin] = entries[pin]
    return out


def pit_record(pit: KvmPitState2) -> Pit:
    channels = [
        PitChannel(**{name: int(getattr(ch, name)) for name in _PIT_FIELDS}) for ch in pit.channels
    ]
    speaker = int(bool(pit.flags & PitFlag.SPEAKER_DATA_ON))
    return Pit.build(channels, speaker_data_on=speaker)


def pit_state(rec: Pit, flags: int, load_times: tuple[int, int, int]) -> KvmPitState2:
    out = KvmPitState2()
    for i in range(3):
        ch = rec.channel(i)
        for name in _PIT_FIELDS:
            setattr(out.channels[i], name, getattr(ch, name))
        t = load_times[i]
        out.channels[i].count_load_time = t - (1 << 64) if t >> 63 else t
    out.flags = flags
    return out


@dataclass
class PlatformRecords:
    """The platform as the stream carries it."""

    entry: KvmPlatformEntry
    pics: tuple[Pic, Pic] | None = None
    ioapic: Ioapic | None = None
    pit: Pit | None = None


def platform_to_xen(state: PlatformState) -> PlatformRecords:
    m, s, io, pit = state.pic_master, state.pic_slave, state.ioapic, state.pit
    times = [int(ch.count_load_time) & U64 for ch in pit.channels] if pit else [0, 0, 0]
    entry = KvmPlatformEntry(
        clock=int(state.clock.clock),
        clock_flags=int(state.clock.flags),
        pit_flags=int(pit.flags) if pit else 0,
        pit_load_time0=times[0],
        pit_load_time1=times[1],
        pit_load_time2=times[2],
        ioapic_irr=int(io.irr) if io else 0,
        master_last_irr=int(m.last_irr) if m else 0,
        master_elcr_mask=int(m.elcr_mask) if m else 0,
        slave_last_irr=int(s.last_irr) if s else 0,
        slave_elcr_mask=int(s.elcr_mask) if s else 0,
    )
    out = PlatformRecords(entry)
    if m is not None and s is not None:
        out.pics = (pic_record(m, master=True), pic_record(s, master=False))
    if io is not None:
        out.ioapic = ioapic_record(io)
    if pit is not None:
        out.pit = pit_record(pit)
    return out


def platform_from_xen(rec: PlatformRecords) -> PlatformState:
    e = rec.entry
    clock = KvmClockData()
    clock.clock, clock.flags = e.clock, e.clock_flags
    state = PlatformState(clock=clock)
    if rec.pics is not None:
        state.pic_master = pic_state(rec.pics[0], e.master_last_irr, e.master_elcr_mask)
        state.pic_slave = pic_state(rec.pics[1], e.slave_last_irr, e.slave_elcr_mask)
    if rec.ioapic is not None:
        state.ioapic = ioapic_state(rec.ioapic, e.ioapic_irr)
    if rec.pit is not None:
        times = (e.pit_load_time0, e.pit_load_time1, e.pit_load_time2)
        state.pit = pit_state(rec.pit, e.pit_flags, times)
    return state
