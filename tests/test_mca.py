"""The MCA architecture layer: MSR arithmetic, register codecs, error classes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmce.mca import (
    MCG_CAP,
    MCG_STATUS,
    MCI_MISC,
    MCI_STATUS,
    REGISTERS,
    BankReg,
    ErrorClass,
    Mcacod,
    Msr,
    bank_msr,
    classify,
    ctl2_msr,
    mcacod_kind,
    msr_name,
    split_bank_msr,
)
from vmce.mca.classify import (
    AmdAddressKind,
    address_is_physical,
    amd_address_kind,
    is_recoverable,
)
from vmce.mca.msr import is_vmce_routed

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


def test_bank_msr_numbers() -> None:
    assert bank_msr(0, BankReg.CTL) == 0x400
    assert bank_msr(1, BankReg.STATUS) == 0x405
    assert bank_msr(31, BankReg.MISC) == 0x47F
    assert ctl2_msr(1) == 0x281
    with pytest.raises(ValueError):
        bank_msr(32, BankReg.CTL)


def test_split_bank_msr_uses_xen_arithmetic() -> None:
    assert split_bank_msr(0x406) == (1, BankReg.ADDR)
    assert split_bank_msr(0x47F) == (31, BankReg.MISC)
    assert split_bank_msr(0x480) is None
    assert split_bank_msr(0xC0000408) is None


def test_routed_ranges() -> None:
    routed = [0x0, 0x1, 0x179, 0x17A, 0x17B, 0x280, 0x29F, 0x400, 0x47F, 0x4D0]
    not_routed = [
        0x2,
        0x3A,
        0x178,
        0x17C,
        0x180,
        0x189,
        0x27F,
        0x2A0,
        0x3FF,
        0x480,
        0x4CF,
        0x4D1,
        0xC0000408,
    ]
    assert all(is_vmce_routed(m) for m in routed)
    assert not any(is_vmce_routed(m) for m in not_routed)


def test_msr_names() -> None:
    assert msr_name(0x405) == "MC1_STATUS"
    assert msr_name(0x281) == "MC1_CTL2"
    assert msr_name(Msr.MCG_CAP) == "MCG_CAP"
    assert msr_name(0x12345) == "MSR_0x12345"


def test_render_matches_the_issue_example() -> None:
    assert MCI_STATUS.render(0xBD000000000000C0) == "VAL|UC|EN|MISCV|ADDRV|S MCACOD=0x00c0"
    assert MCG_STATUS.render(0x5) == "MCIP|RIPV"
    assert MCG_CAP.render(0x1000C02) == "SER_P|TES_P|CMCI_P COUNT=0x02"
    assert MCI_MISC.render(0x86) == "MODE=0x2 LSB=0x06"
    assert MCG_STATUS.render(0) == "0"
    assert MCG_STATUS.render(0x30) == "RSVD=0x30"


def test_decode_fields() -> None:
    f = MCI_STATUS.decode(0xBD2000008000017A)
    assert f["VAL"] == f["UC"] == f["EN"] == f["MISCV"] == f["ADDRV"] == f["S"] == 1
    assert f["PCC"] == f["AR"] == f["OVER"] == 0
    assert f["MCACOD"] == 0x17A
    assert f["MSCOD"] == 0x8000
    assert f["THRESHOLD"] == 1
    assert MCG_CAP.encode(count=2, ser_p=1, tes_p=1, cmci_p=1) == 0x1000C02


def test_encode_rejects_overflowing_fields() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        MCG_CAP.encode(count=256)
    with pytest.raises(KeyError):
        MCG_CAP.encode(nope=1)
    with pytest.raises(ValueError):
        MCI_STATUS.decode(1 << 64)


@pytest.mark.parametrize("reg", list(REGISTERS.values()), ids=list(REGISTERS))
@given(value=u64)
def test_decode_encode_round_trip(reg: object, value: int) -> None:
    from vmce.mca import Register

    assert isinstance(reg, Register)
    fields = reg.decode(value)
    assert reg.encode(**fields) == value


@given(value=u64)
def test_render_lists_every_set_flag(value: int) -> None:
    text = MCI_STATUS.render(value)
    head = text.split(" ")[0]
    for f in MCI_STATUS.fields:
        if f.is_flag:
            assert (f.name in head.split("|")) == bool(f.get(value))


CLASSES = [
    (0x0000000000000000, ErrorClass.INVALID),
    (0xBF000000000000C0, ErrorClass.FATAL),  # PCC
    (0x9400000000000151, ErrorClass.CORRECTED),  # xen-mceinj type 3
    (0xBD000000000000C0, ErrorClass.SRAO),
    (0xBD2000008000017A, ErrorClass.SRAO),
    (0xBD80000000000134, ErrorClass.SRAR),
    (0xFD80000000000134, ErrorClass.FATAL),  # SRAR + OVER
    (0xFD000000000000C0, ErrorClass.SRAO),  # SRAO: OVER not examined
    (0xBC20000080000136, ErrorClass.UCNA),  # xen-mceinj type 2
]


@pytest.mark.parametrize(("status", "expected"), CLASSES)
def test_classify(status: int, expected: ErrorClass) -> None:
    assert classify(status) is expected


def test_classify_without_ser_is_fatal_for_uc() -> None:
    assert classify(0xBD000000000000C0, ser=False) is ErrorClass.FATAL
    assert classify(0x9400000000000151, ser=False) is ErrorClass.CORRECTED


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (0xC0, Mcacod.MEMORY_SCRUB),
        (0xCF, Mcacod.MEMORY_SCRUB),
        (0x17A, Mcacod.L3_WRITEBACK),
        (0x134, Mcacod.DATA_LOAD),
        (0x150, Mcacod.INSTRUCTION_FETCH),
        (0xD0, Mcacod.OTHER),
        (0x10C0, Mcacod.OTHER),
    ],
)
def test_mcacod_kinds(code: int, kind: Mcacod) -> None:
    assert mcacod_kind(0xBD00000000000000 | code) is kind


def test_recoverable_scan() -> None:
    assert is_recoverable(0x9400000000000151)  # corrected
    assert is_recoverable(0xA000000000000000)  # spurious: UC, EN=0, OVER=0
    assert is_recoverable(0xBD80000000000134)  # SRAR
    assert not is_recoverable(0xFD80000000000134)  # SRAR with OVER
    assert is_recoverable(0xBD000000000000C0)  # SRAO
    assert not is_recoverable(0xBD000000000000C0, ser=False)
    assert is_recoverable(0xBC20000080000136)  # UCNA
    assert is_recoverable(0xAD000000000000C0)  # EN=0, OVER=0: spurious
    assert not is_recoverable(0xED000000000000C0)  # SRAO without EN, with OVER


def test_physical_address_rule() -> None:
    assert address_is_physical(0xBD000000000000C0, 0x86)
    assert address_is_physical(0xBD000000000000C0, 0x8C)
    assert not address_is_physical(0xB5000000000000C0, 0x86)  # no MISCV
    assert not address_is_physical(0xBD000000000000C0, 0x46)  # linear mode


def test_amd_address_kind() -> None:
    assert amd_address_kind(0x0800) is AmdAddressKind.PHYSICAL
    assert amd_address_kind(0x0100) is AmdAddressKind.PHYSICAL
    assert amd_address_kind(0x0010) is AmdAddressKind.VIRTUAL
    assert amd_address_kind(0x0810) is AmdAddressKind.PHYSICAL
    assert amd_address_kind(0x10000) is AmdAddressKind.UNKNOWN  # only 16 bits looked at
