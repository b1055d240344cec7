"""Typed codecs for the MCA registers: decode a 64-bit value into named fields and back.

Each register layout is declared once as a :class:`Register` (a table of :class:`Field`), and
everything else (decode, encode, the one-line rendering for people, the JSON form) derives from
that table.
"""

from __future__ import annotations

from dataclasses import dataclass

U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Field:
    """One bit field of a register: ``width`` bits starting at bit ``lo``."""

    name: str
    lo: int
    width: int = 1
    doc: str = ""
    #: Multi-bit fields shown even when zero (e.g. MCACOD) when a value is rendered.
    always_show: bool = False

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.lo

    @property
    def is_flag(self) -> bool:
        return self.width == 1

    def get(self, value: int) -> int:
        return (value >> self.lo) & ((1 << self.width) - 1)

    def put(self, value: int, field_value: int) -> int:
        if not 0 <= field_value < (1 << self.width):
            raise ValueError(f"{self.name}={field_value:#x} does not fit in {self.width} bit(s)")
        return (value & ~self.mask) | (field_value << self.lo)


@dataclass(frozen=True)
class Register:
    """A 64-bit register layout: a name and its fields, highest bit first when rendered."""

    name: str
    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        seen = 0
        for f in self.fields:
            if f.mask & seen:
                raise ValueError(f"{self.name}: field {f.name} overlaps another field")
            if f.lo + f.width > 64:
                raise ValueError(f"{self.name}: field {f.name} runs past bit 63")
            seen |= f.mask

    @property
    def defined_mask(self) -> int:
        m = 0
        for f in self.fields:
            m |= f.mask
        return m

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name.upper():
                return f
        raise KeyError(f"{self.name} has no field {name!r}")

    def decode(self, value: int) -> dict[str, int]:
        """Every field's value, plus ``RSVD`` for set bits that no field defines."""
        check_u64(value)
        out = {f.name: f.get(value) for f in self.fields}
        out["RSVD"] = value & ~self.defined_mask & U64
        return out

    def encode(self, **fields: int) -> int:
        """The register value with the named fields set (others zero)."""
        value = 0
        for name, v in fields.items():
            if name.upper() == "RSVD":
                if v & self.defined_mask:
                    raise ValueError(f"RSVD={v:#x} overlaps defined fields of {self.name}")
                value |= v
                continue
            value = self.field(name).put(value, v)
        return value

    def render(self, value: int) -> str:
        """A compact one-line form, e.g. ``VAL|UC|EN|MISCV|ADDRV|S MCACOD=0x00c0``."""
        check_u64(value)
        flags: list[str] = []
        parts: list[str] = []
        for f in sorted(self.fields, key=lambda f: -f.lo):
            v = f.get(value)
            if f.is_flag:
                if v:
                    flags.append(f.name)
            elif v or f.always_show:
                digits = (f.width + 3) // 4
                parts.append(f"{f.name}=0x{v:0{digits}x}")
        rsvd = value & ~self.defined_mask & U64
        if rsvd:
            parts.append(f"RSVD=0x{rsvd:x}")
        head = "|".join(flags)
        return " ".join(p for p in [head, *parts] if p) or "0"


def check_u64(value: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an unsigned 64-bit integer."""
    if not 0 <= value <= U64:
        raise ValueError(f"{value:#x} is not an unsigned 64-bit value")


MCG_CAP = Register(
    "MCG_CAP",
    (
        Field("COUNT", 0, 8, "number of banks", always_show=True),
        Field("CTL_P", 8, doc="IA32_MCG_CTL present"),
        Field("EXT_P", 9, doc="extended state MSRs present"),
        Field("CMCI_P", 10, doc="corrected machine-check interrupt supported"),
        Field("TES_P", 11, doc="threshold-based error status present"),
        Field("EXT_CNT", 16, 8, "number of extended state MSRs"),
        Field("SER_P", 24, doc="software error recovery supported"),
        Field("EMC_P", 25, doc="enhanced machine-check capability"),
        Field("ELOG_P", 26, doc="extended error logging"),
        Field("LMCE_P", 27, doc="local machine check supported"),
    ),
)

MCG_STATUS = Register(
    "MCG_STATUS",
    (
        Field("RIPV", 0, doc="restart IP valid"),
        Field("EIPV", 1, doc="error IP valid"),
        Field("MCIP", 2, doc="machine check in progress"),
        Field("LMCE", 3, doc="local machine check signalled"),
    ),
)

MCG_EXT_CTL = Register("MCG_EXT_CTL", (Field("LMCE_EN", 0, doc="local MCE enabled"),))

MCI_STATUS = Register(
    "MCi_STATUS",
    (
        Field("MCACOD", 0, 16, "architectural MCA error code", always_show=True),
        Field("MSCOD", 16, 16, "model-specific error code"),
        Field("OTHER", 32, 21, "other information (bits 52:32)"),
        Field("THRESHOLD", 53, 2, "threshold-based error status (TES_P)"),
        Field("AR", 55, doc="action required"),
        Field("S", 56, doc="signalled by #MC"),
        Field("PCC", 57, doc="processor context corrupt"),
        Field("ADDRV", 58, doc="MCi_ADDR valid"),
        Field("MISCV", 59, doc="MCi_MISC valid"),
        Field("EN", 60, doc="error reporting enabled"),
        Field("UC", 61, doc="uncorrected"),
        Field("OVER", 62, doc="overflow"),
        Field("VAL", 63, doc="valid"),
    ),
)

MCI_MISC = Register(
    "MCi_MISC",
    (
        Field("LSB", 0, 6, "least significant valid address bit", always_show=True),
        Field("MODE", 6, 3, "address mode (2 = physical)", always_show=True),
        Field("MODEL", 9, 55, "model-specific information"),
    ),
)

MCI_CTL2 = Register(
    "MCi_CTL2",
    (
        Field("THRESHOLD", 0, 15, "corrected-error threshold"),
        Field("CMCI_EN", 30, doc="CMCI enabled for this bank"),
    ),
)

#: Registers by the name the CLI takes (``vmce decode --kind``).
REGISTERS: dict[str, Register] = {
    "status": MCI_STATUS,
    "mcg-status": MCG_STATUS,
    "mcg-cap": MCG_CAP,
    "misc": MCI_MISC,
    "ctl2": MCI_CTL2,
    "mcg-ext-ctl": MCG_EXT_CTL,
}
