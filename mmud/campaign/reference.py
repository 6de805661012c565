"""An independent reference for one x86-64 access, written from the SDM (vol. 3A §4.5, §4.6).

The fuzzer, the access-rights matrix and the tests compare every answer of mmud's shadow MMU
with this walk. It shares no code with the MMU it judges: it imports nothing from mmud (not
mmud.kvm, not mmud.x86), reads guest memory through a callable and takes the control
registers as numbers. 4-level paging, 4 KiB and 2 MiB pages, MAXPHYADDR 46, CR4.PKE off.

Besides the outcome it says which accessed/dirty bits the access leaves in the guest's
entries (SDM §4.8): a successful access sets A in every entry it used and D in the leaf when
it writes. A faulting one sets nothing: hardware may set A in the upper entries it used
before the fault, but under shadow paging the guest sees KVM's walker, which updates A/D only
after the whole walk and its permission checks succeeded (docs/x86-paging.md §7).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

P, W, U, A, D, PS, NX = 1, 2, 4, 0x20, 0x40, 0x80, 1 << 63
ADDR = ((1 << 46) - 1) & ~0xFFF
CR0_WP = 1 << 16
CR4_SMEP, CR4_SMAP = 1 << 20, 1 << 21
EFER_NXE = 1 << 11
RFLAGS_AC = 1 << 18
PFERR_PRESENT, PFERR_WRITE, PFERR_USER, PFERR_RSVD, PFERR_FETCH = 1, 2, 4, 8, 0x10


def idx(va: int, level: int) -> int:
    """The index of va's entry in its level-`level` table."""
    return (va >> (12 + 9 * (level - 1))) & 511


@dataclass(frozen=True)
class Expect:
    """What an access does: a #PF with its error code, or the guest-physical address; and
    `ad`, the bits it sets in the guest's entries as (entry gpa, bits), one pair for every
    entry the walk used, root first and leaf last (empty for a fault)."""

    fault: bool
    error_code: int = 0
    gpa: int | None = None
    ad: tuple[tuple[int, int], ...] = ()


def outcome(fault: bool, error_code: int, gpa: int | None) -> str:
    """An access's outcome as a mismatch report prints it (mmud's or the reference's)."""
    return f"#PF error code {error_code:#x}" if fault else f"gpa {gpa:#x}" if gpa is not None else "no fault"


@dataclass(frozen=True)
class Regs:
    """The register state a walk depends on."""

    cr0: int
    cr3: int
    cr4: int
    efer: int
    rflags: int


def reference_walk(read_u64: Callable[[int], int], regs: Regs, va: int, *,
                   write: bool = False, fetch: bool = False, user: bool = False) -> Expect:
    """What the SDM says one access does, given the guest's tables and control registers."""
    nxe = bool(regs.efer & EFER_NXE)
    smep = bool(regs.cr4 & CR4_SMEP)
    access_bits = (PFERR_WRITE if write else 0) | (PFERR_USER if user else 0)
    if fetch and (nxe or smep):
        access_bits |= PFERR_FETCH
    table = regs.cr3 & ADDR
    rw = us = True
    xd = False
    large = False
    used: list[int] = []  # the gpa of each entry the walk read
    for level in (4, 3, 2, 1):
        used.append(table + 8 * idx(va, level))
        entry = read_u64(used[-1])
        if not entry & P:
            return Expect(True, access_bits)
        rsvd = ((1 << 52) - 1) & ~((1 << 46) - 1)
        if not nxe:
            rsvd |= NX
        large = level == 2 and bool(entry & PS)
        if level in (4, 3):
            rsvd |= PS
        if large:
            rsvd |= ((1 << 21) - 1) & ~((1 << 13) - 1)
        if entry & rsvd:
            return Expect(True, access_bits | PFERR_PRESENT | PFERR_RSVD)
        rw &= bool(entry & W)
        us &= bool(entry & U)
        xd |= nxe and bool(entry & NX)
        if level == 1 or large:
            break
        table = entry & ADDR
    if user:
        denied = not us or (write and not rw) or (fetch and xd)
    elif fetch:
        denied = xd or (smep and us)
    else:
        smap_denies = bool(regs.cr4 & CR4_SMAP) and us and not regs.rflags & RFLAGS_AC
        denied = smap_denies or (write and bool(regs.cr0 & CR0_WP) and not rw)
    if denied:
        return Expect(True, access_bits | PFERR_PRESENT)
    ad = tuple((gpa, A) for gpa in used[:-1]) + ((used[-1], A | D if write else A),)
    if large:
        return Expect(False, 0, (entry & ADDR & ~((1 << 21) - 1)) | (va & ((1 << 21) - 1)), ad)
    return Expect(False, 0, (entry & ADDR) | (va & 0xFFF), ad)
