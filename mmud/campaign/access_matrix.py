"""The x86 access-rights matrix: which guest entries, control bits and accesses it combines.

The matrix follows kvm-unit-tests' x86/access.c (docs/access-matrix.md maps one to the
other). A job fixes the control bits (EFER.NXE, CR0.WP, CR4.SMEP, CR4.SMAP, RFLAGS.AC), the
rights of the two upper entries and the protection-key bits; inside a job every legal
combination of the PDE and PTE flags meets every access (read, write, fetch; user or
supervisor; once, or after a supervisor read as access.c's "twice").

Pure data: nothing here touches a VM, so the cases of a job can be listed and counted
without running them.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from mmud.campaign.reference import NX, PS, A, D, P, U, W

# A table flag: (name as access.c prints it, level, bit).  Bits 51 and 46 are reserved with
# MAXPHYADDR 46: access.c's bit 36 is its lowest reserved address bit for MAXPHYADDR 36 (it
# drops the flag on wider CPUs), bit 46 is ours.  Bit 13 is reserved in a 2 MiB PDE only.
LOWER_FLAGS: tuple[tuple[str, int, int], ...] = (
    ("pte.p", 1, P), ("pte.rw", 1, W), ("pte.user", 1, U), ("pte.a", 1, A), ("pte.d", 1, D),
    ("pte.nx", 1, NX), ("pte.51", 1, 1 << 51), ("pte.46", 1, 1 << 46),
    ("pde.p", 2, P), ("pde.rw", 2, W), ("pde.user", 2, U), ("pde.a", 2, A), ("pde.d", 2, D),
    ("pde.pse", 2, PS), ("pde.nx", 2, NX), ("pde.51", 2, 1 << 51), ("pde.46", 2, 1 << 46),
    ("pde.13", 2, 1 << 13),
)
PDE_FLAGS = tuple(f for f in LOWER_FLAGS if f[1] == 2)
PTE_FLAGS = tuple(f for f in LOWER_FLAGS if f[1] == 1)
RESERVED = (1 << 51) | (1 << 46) | (1 << 13)

# What an `upper` job axis value may name, '+'-joined: the PML4E and PDPTE start as
# P | RW | U (access.c's), and each name changes one bit of one of them.  "pdpte.ro" is
# access.c's AC_PDPTE_NO_WRITABLE; the others extend it to both upper levels.
UPPER_BASE = P | W | U
UPPER_EDITS: dict[str, tuple[int, int, bool]] = {  # name -> (level, bit, set it?)
    f"{entry}.{what}": (level, bit, setting)
    for entry, level in (("pml4e", 4), ("pdpte", 3))
    for what, bit, setting in (
        ("np", P, False), ("ro", W, False), ("nouser", U, False), ("nx", NX, True),
        ("a", A, True), ("ps", PS, True), ("51", 1 << 51, True),
    )
}

# access.c's AC_PKU_PKEY with CR4.PKE = 0: key 1 in the leaf, key 2 in a PDE that points to
# a table; both must be ignored.
PKEY_LEAF, PKEY_TABLE = 1 << 59, 2 << 59

# An access: (name, write, fetch, user, twice).  access.c never combines write and fetch.
ACCESSES: tuple[tuple[str, bool, bool, bool, bool], ...] = tuple(
    (" ".join(n for n, on in (("user", user), (kind, True), ("twice", twice)) if on),
     kind == "write", kind == "fetch", user, twice)
    for twice in (False, True) for user in (False, True) for kind in ("read", "write", "fetch")
)

# An entry the walk never reads is held at this value (a valid, fully accessible entry), so
# that a walker that wrongly reads it finds a mapping instead of a fault.
HELD = P | W | U | A | D


@dataclass(frozen=True)
class Cpu:
    """The control bits of a job."""

    efer_nxe: bool
    cr0_wp: bool
    cr4_smep: bool
    cr4_smap: bool
    rflags_ac: bool

    def names(self) -> list[str]:
        return [n for n, on in (("efer.nx", self.efer_nxe), ("cr0.wp", self.cr0_wp),
                                ("cr4.smep", self.cr4_smep), ("cr4.smap", self.cr4_smap),
                                ("rflags.ac", self.rflags_ac)) if on]


def upper_edits(upper: str) -> list[str]:
    """The edits an `upper` axis value names ("none": access.c's P | RW | U at both levels)."""
    return [] if upper == "none" else upper.split("+")


def upper_entries(upper: str) -> tuple[int, int]:
    """The PML4E and PDPTE flag bits of an `upper` axis value."""
    entries = {4: UPPER_BASE, 3: UPPER_BASE}
    for name in upper_edits(upper):
        if name not in UPPER_EDITS:
            raise ValueError(f"unknown upper-entry edit {name!r} (known: {', '.join(UPPER_EDITS)})")
        level, bit, setting = UPPER_EDITS[name]
        entries[level] = entries[level] | bit if setting else entries[level] & ~bit
    return entries[4], entries[3]


def walks_past(entry: int, level: int, nxe: bool) -> bool:
    """Whether a walk reads the table below this entry (level 4, 3 or 2): present, none of
    the matrix's reserved bits set, and not a leaf."""
    if level == 2 and entry & PS:
        return False
    reserved = (1 << 51) | (1 << 46) | (0 if nxe else NX) | (PS if level > 2 else 0)
    return bool(entry & P) and not entry & reserved


def _combos(flags: tuple[tuple[str, int, int], ...]) -> Iterator[int]:
    for on in itertools.product((False, True), repeat=len(flags)):
        yield sum(bit for (_, _, bit), set_ in zip(flags, on, strict=True) if set_)


def _reserved_count(entry: int, nxe: bool) -> int:
    return bin(entry & (RESERVED | (0 if nxe else NX))).count("1")


@functools.cache
def lower_entries(nxe: bool, upper: str) -> tuple[tuple[int, int], ...]:
    """Every legal (PDE, PTE) flag combination of a job, in a fixed order.

    access.c's filters: bit 13 only in a 2 MiB PDE; at most one reserved bit in the pair
    (bit 63 counts as one when NXE is off).  Beyond access.c, the flags of an entry the walk
    never reads (below a non-present, reserved or leaf entry) are not varied but held at
    HELD: access.c repeats such a case once for every value of the unread entry.
    """
    pml4e, pdpte = upper_entries(upper)
    if not (walks_past(pml4e, 4, nxe) and walks_past(pdpte, 3, nxe)):
        return ((HELD, HELD),)
    pairs: list[tuple[int, int]] = []
    for pde in _combos(PDE_FLAGS):
        if pde & (1 << 13) and not pde & PS:
            continue
        rsvd = _reserved_count(pde, nxe)
        if rsvd > 1:
            continue
        if not walks_past(pde, 2, nxe):
            pairs.append((pde, HELD))
            continue
        pairs.extend((pde, pte) for pte in _combos(PTE_FLAGS) if rsvd + _reserved_count(pte, nxe) <= 1)
    return tuple(pairs)


def flag_names(pde: int, pte: int) -> list[str]:
    """The access.c names of the flags set in a (PDE, PTE) pair."""
    return [name for name, level, bit in LOWER_FLAGS if (pde if level == 2 else pte) & bit]


def job_cases(nxe: bool, upper: str, sample: int = 1, offset: int = 0) -> Iterator[tuple[int, int, int]]:
    """The cases of a job as (PDE, PTE, index into ACCESSES): every `sample`-th from `offset`."""
    pairs = lower_entries(nxe, upper)
    n = len(ACCESSES)
    for i in range(offset % sample, len(pairs) * n, sample):
        pde, pte = pairs[i // n]
        yield pde, pte, i % n
