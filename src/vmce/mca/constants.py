"""Plain-int masks derived from the register tables in :mod:`vmce.mca.bits`.

They are ints (not enum members) because the vMCE MSR paths use them on every guest access.
"""

from __future__ import annotations

from vmce.mca.bits import MCG_CAP, MCG_EXT_CTL, MCG_STATUS, MCI_CTL2, MCI_MISC, MCI_STATUS

# IA32_MCG_CAP
MCG_CAP_COUNT = MCG_CAP.field("COUNT").mask
MCG_CTL_P = MCG_CAP.field("CTL_P").mask
MCG_EXT_P = MCG_CAP.field("EXT_P").mask
MCG_CMCI_P = MCG_CAP.field("CMCI_P").mask
MCG_TES_P = MCG_CAP.field("TES_P").mask
MCG_SER_P = MCG_CAP.field("SER_P").mask
MCG_LMCE_P = MCG_CAP.field("LMCE_P").mask

# IA32_MCG_STATUS
MCG_STATUS_RIPV = MCG_STATUS.field("RIPV").mask
MCG_STATUS_EIPV = MCG_STATUS.field("EIPV").mask
MCG_STATUS_MCIP = MCG_STATUS.field("MCIP").mask
MCG_STATUS_LMCE = MCG_STATUS.field("LMCE").mask

# IA32_MCG_EXT_CTL
MCG_EXT_CTL_LMCE_EN = MCG_EXT_CTL.field("LMCE_EN").mask

# IA32_MCi_STATUS
MCI_STATUS_MCACOD = MCI_STATUS.field("MCACOD").mask
MCI_STATUS_MSCOD = MCI_STATUS.field("MSCOD").mask
MCI_STATUS_AR = MCI_STATUS.field("AR").mask
MCI_STATUS_S = MCI_STATUS.field("S").mask
MCI_STATUS_PCC = MCI_STATUS.field("PCC").mask
MCI_STATUS_ADDRV = MCI_STATUS.field("ADDRV").mask
MCI_STATUS_MISCV = MCI_STATUS.field("MISCV").mask
MCI_STATUS_EN = MCI_STATUS.field("EN").mask
MCI_STATUS_UC = MCI_STATUS.field("UC").mask
MCI_STATUS_OVER = MCI_STATUS.field("OVER").mask
MCI_STATUS_VAL = MCI_STATUS.field("VAL").mask
#: Every status value copied into a guest bank is ANDed with this (MSCOD cleared).
MCI_STATUS_MSCOD_FILTER = 0xFFFF_FFFF_0000_FFFF

# IA32_MCi_MISC (Intel)
MCI_MISC_ADDR_MODE = MCI_MISC.field("MODE").mask
MCI_MISC_PHYSMOD = 2 << MCI_MISC.field("MODE").lo

# IA32_MCi_CTL2
MCI_CTL2_CMCI_EN = MCI_CTL2.field("CMCI_EN").mask
MCI_CTL2_THRESHOLD = MCI_CTL2.field("THRESHOLD").mask

ALL_ONES = (1 << 64) - 1

#: Architectural exception vector of #MC.
MC_VECTOR = 18
#: CR4.MCE.
CR4_MCE = 1 << 6
