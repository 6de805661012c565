"""The MMU audit's checks: the kernel's six (mmu_audit.c, ≤v5.17) and mmud's extended ones.

Each check takes the MMU and a set of shadow pages and returns message texts (without the
`audit: (<point>) error: ` prefix, which the audit adds). They are vectorised per shadow
page: a page's 512 sptes are one numpy row, so the cost is a few numpy operations per page.

Kernel checks (exact texts):
  1 audit_mappings        "unsync sp: %p level = %d\\n", "levels %d pfn %llx hpa %llx ent %llxn"
  2 inspect_spte_has_rmap "no memslot for gfn %llx\\n" + "index %ld of sp (gfn=%llx)\\n",
                          "no rmap for writable spte %llx\\n"
  3 audit_sptes_have_rmaps  (2 on each present leaf reached from the root)
  4 audit_spte_after_sync "meet unsync sp(%p) after sync root.\\n"
  5 check_mappings_rmap     (2 on each present spte of every active level-1 page)
  6 audit_write_protection "shadow page has writable mappings: gfn %llx role %x\\n"
Extended checks (mmud):
  rmap_exact       rmaps and leaf sptes agree both ways, entry for entry
  parent_links     parent_ptes and non-leaf sptes agree; unsync_children = popcount(bitmap);
                   every link to an unsync page (or one with unsync children) is marked
  translation      each spte of a synced indirect page equals what the guest's tables allow
                   now: same frame, no more rights (CR0.WP=0's supervisor-write shape allowed)
  write_tracking   every upper-level guest table with a valid shadow page is write-tracked
  dirty_log        every page of a logged slot is dirty in its bitmap or not writable
"""

from __future__ import annotations

from collections.abc import Iterable
import numpy as np

from mmud.kvm.memslot import Memslot
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.mmu import KvmMmu
from mmud.kvm.mmu.page import ROLE_CR0_WP, ROLE_NXE, ShadowPage, sp_address
from mmud.x86.paging import (
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    PAGE_SHIFT,
    PT64_BASE_ADDR_MASK,
    PT64_LVL2_LARGE_ADDR_MASK,
    PT64_NX_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    rsvd_bits,
)

_U = np.uint64
_PRESENT = _U(S.SPTE_MMU_PRESENT)
_ADDR = _U(S.SPTE_BASE_ADDR_MASK)
_IDX = np.arange(512, dtype=np.uint64)


class RmapIndex:
    """Per-slot arrays built once per audit run: which gfns have a non-empty level-1 rmap."""

    def __init__(self, mmu: KvmMmu) -> None:
        self.mmu = mmu
        self.has_rmap: dict[int, np.ndarray] = {}
        for slot in mmu.memslots:
            mask = np.zeros(slot.npages, dtype=bool)
            if slot.rmap:
                keys = np.fromiter(slot.rmap.keys(), dtype=np.int64, count=len(slot.rmap))
                mask[keys - slot.base_gfn] = True
            self.has_rmap[slot.id] = mask


def _sp_gfns(sp: ShadowPage) -> np.ndarray:
    if sp.direct:
        return _U(sp.gfn) + (_IDX << _U((sp.level - 1) * 9))
    return sp._gfns_np


def _leaf_mask(sp: ShadowPage) -> np.ndarray:
    row = sp.sptes
    present = (row & _PRESENT) != 0
    if sp.level == 1:
        return present
    return present & ((row & _U(PT_PAGE_SIZE_MASK)) != 0)


def _slot_split(mmu: KvmMmu, gfns: np.ndarray) -> Iterable[tuple[Memslot | None, np.ndarray]]:
    """Partition positions of gfns by memslot (None: no memslot)."""
    remaining = np.ones(len(gfns), dtype=bool)
    for slot in mmu.memslots:
        inside = (gfns >= _U(slot.base_gfn)) & (gfns < _U(slot.end_gfn))
        if inside.any():
            yield slot, np.flatnonzero(inside)
            remaining &= ~inside
    if remaining.any():
        yield None, np.flatnonzero(remaining)


def inspect_sptes_have_rmap(rmaps: RmapIndex, sp: ShadowPage, idx: np.ndarray) -> list[str]:
    """Check 2 for the entries idx of sp (all present leaves)."""
    out: list[str] = []
    if not len(idx):
        return out
    gfns = _sp_gfns(sp)[idx]
    for slot, pos in _slot_split(rmaps.mmu, gfns):
        if slot is None:
            for p in pos.tolist():
                out.append(f"no memslot for gfn {int(gfns[p]):x}\n")
                out.append(f"index {int(idx[p])} of sp (gfn={sp.gfn:x})\n")
            continue
        missing = ~rmaps.has_rmap[slot.id][(gfns[pos] - _U(slot.base_gfn)).astype(np.int64)]
        for p in pos[missing].tolist():
            out.append(f"no rmap for writable spte {int(sp.sptes[idx[p]]):x}\n")
    return out


def check_mappings_rmap(rmaps: RmapIndex, sp: ShadowPage) -> list[str]:
    """Check 5."""
    if sp.level != 1:
        return []
    return inspect_sptes_have_rmap(rmaps, sp, np.flatnonzero((sp.sptes & _PRESENT) != 0))


def audit_write_protection(mmu: KvmMmu, sp: ShadowPage) -> list[str]:
    """Check 6: a synced indirect page's guest table has no writable 4 KiB mapping."""
    # Obsolete, not only invalid: between the lock breaks of a fast zap, pages of the old
    # generation wait on the list while faults (which no longer see them) map their gfns
    # writable. The kernel's check tests role.invalid alone and reports those as errors.
    if sp.direct or sp.unsync or mmu.is_obsolete_sp(sp):
        return []
    slot = mmu.memslots.lookup(sp.gfn)
    if slot is None:
        return []
    pages = mmu.pool.pages
    out = []
    for sptep in slot.rmap.get(sp.gfn, ()):
        if pages[sptep >> 9].spt[sptep & 0x1FF] & PT_WRITABLE_MASK:
            out.append(f"shadow page has writable mappings: gfn {sp.gfn:x} role {sp.role:x}\n")
    return out


def walk_checks(
    mmu: KvmMmu,
    rmaps: RmapIndex,
    sps: Iterable[ShadowPage],
    point: str,
    root_level: int,
    synced: set[ShadowPage] | None = None,
) -> list[str]:
    """Checks 3, 1 and 4 for each entry of each page reached from the root, in that order.

    Per entry the kernel calls 3, 1, 4; the messages of one page are grouped the same way
    (the order between entries of one page is the entry order for each message kind).
    Check 4 applies to the pages the sync just walked: `synced`, or all of sps if None.
    """
    out: list[str] = []
    post_sync = point == "post sync"
    for sp in sps:
        leaves = np.flatnonzero(_leaf_mask(sp))
        out.extend(inspect_sptes_have_rmap(rmaps, sp, leaves))
        if sp.unsync and sp.level != 1:
            out.extend([f"unsync sp: {sp_address(sp)} level = {sp.level}\n"] * 512)
        elif len(leaves):
            gfns = _sp_gfns(sp)[leaves]
            for slot, pos in _slot_split(mmu, gfns):
                if slot is None:
                    continue
                want = (gfns[pos] - _U(slot.base_gfn) + _U(slot.backing.base_pfn)) << _U(PAGE_SHIFT)
                got = sp.sptes[leaves[pos]]
                bad = (got & _ADDR) != want
                for p in np.flatnonzero(bad).tolist():
                    pfn = int(want[p]) >> PAGE_SHIFT
                    out.append(
                        f"levels {root_level} pfn {pfn:x} hpa {pfn << PAGE_SHIFT:x} ent {int(got[p]):x}n"
                    )
        if post_sync and sp.unsync and (synced is None or sp in synced):
            out.extend([f"meet unsync sp({sp_address(sp)}) after sync root.\n"] * 512)
    return out


def children(mmu: KvmMmu, sp: ShadowPage) -> list[ShadowPage]:
    """The shadow pages sp's present non-leaf sptes point at, in entry order."""
    row = sp.sptes
    nonleaf = np.flatnonzero(((row & _PRESENT) != 0) & ((row & _U(PT_PAGE_SIZE_MASK)) == 0))
    return [mmu.child_of(int(row[i])) for i in nonleaf.tolist()]


def unsync_paths(mmu: KvmMmu, root: ShadowPage) -> list[ShadowPage]:
    """Pages on root's unsync-child paths (read-only: stale bits are left as they are)."""
    out: list[ShadowPage] = []
    todo = [root]
    while todo:
        sp = todo.pop()
        out.append(sp)
        bitmap = sp.unsync_child_bitmap
        while bitmap:
            low = bitmap & -bitmap
            bitmap ^= low
            spte = sp.spt[low.bit_length() - 1]
            if spte & S.SPTE_MMU_PRESENT and not spte & PT_PAGE_SIZE_MASK:
                todo.append(mmu.child_of(spte))
    return out


def reaches(mmu: KvmMmu, sp: ShadowPage, root: ShadowPage) -> bool:
    """Whether root's tree contains sp (following parent_ptes upward)."""
    pages = mmu.pool.pages
    seen: set[ShadowPage] = set()
    todo = [sp]
    while todo:
        page = todo.pop()
        if page is root:
            return True
        if page not in seen:
            seen.add(page)
            todo.extend(pages[p >> 9] for p in page.parent_ptes)
    return False


def reachable_pages(mmu: KvmMmu, root: ShadowPage) -> list[ShadowPage]:
    """Pages of the vCPU's tree in depth-first order from the root (the kernel's walk)."""
    out: list[ShadowPage] = []
    stack = [root]
    while stack:
        sp = stack.pop()
        out.append(sp)
        if sp.level > 1:
            stack.extend(reversed(children(mmu, sp)))
    return out


# --- extended checks -------------------------------------------------------------------------

def check_rmap_exact(mmu: KvmMmu, sps: Iterable[ShadowPage], gfns: set[int] | None) -> list[str]:
    """Leaf sptes of sps are in their rmap; rmap entries (of gfns, or all) are live leaves."""
    out: list[str] = []
    for sp in sps:
        leaves = np.flatnonzero(_leaf_mask(sp)).tolist()
        for i in leaves:
            gfn = sp.gfn_of(i)
            slot = mmu.memslots.lookup(gfn)
            if slot is None or (sp.index << 9 | i) not in slot.rmap.get(gfn, ()):
                out.append(
                    f"spte {sp.spt[i]:x} (sp {sp_address(sp)} index {i} gfn {gfn:x}) is not in its rmap\n"
                )
    pages = mmu.pool.pages
    for slot in mmu.memslots:
        keys = slot.rmap.keys() if gfns is None else [g for g in gfns if g in slot.rmap]
        for gfn in keys:
            for sptep in slot.rmap[gfn]:
                sp, i = pages[sptep >> 9], sptep & 0x1FF
                spte = sp.spt[i]
                live = sp in mmu.active_mmu_pages and spte & S.SPTE_MMU_PRESENT
                if not live or not S.is_last_spte(spte, sp.level) or sp.gfn_of(i) != gfn:
                    out.append(
                        f"rmap of gfn {gfn:x} holds sp {sp_address(sp)} index {i} spte {spte:x}, which does not map it\n"
                    )
    return out


def check_parent_links(mmu: KvmMmu, sps: Iterable[ShadowPage]) -> list[str]:
    out: list[str] = []
    pages = mmu.pool.pages
    for sp in sps:
        if sp.unsync_children != sp.unsync_child_bitmap.bit_count():
            out.append(
                f"sp {sp_address(sp)} unsync_children {sp.unsync_children} but {sp.unsync_child_bitmap.bit_count()} bits\n"
            )
        for sptep in sp.parent_ptes:
            parent, i = pages[sptep >> 9], sptep & 0x1FF
            spte = parent.spt[i]
            if not spte & S.SPTE_MMU_PRESENT or S.spte_child_index(spte) != sp.index:
                out.append(
                    f"sp {sp_address(sp)} lists parent {sp_address(parent)} index {i}, which does not point at it\n"
                )
            elif (sp.unsync or sp.unsync_children) and not parent.unsync_child_bitmap >> i & 1:
                out.append(
                    f"sp {sp_address(sp)} is unsync below {sp_address(parent)} index {i} but the bit is clear\n"
                )
        if sp.level == 1:
            continue
        row = sp.sptes
        for i in np.flatnonzero(((row & _PRESENT) != 0) & ((row & _U(PT_PAGE_SIZE_MASK)) == 0)).tolist():
            child = mmu.child_of(sp.spt[i])
            if (sp.index << 9 | i) not in child.parent_ptes:
                out.append(
                    f"sp {sp_address(sp)} index {i} points at {sp_address(child)}, which does not list it as parent\n"
                )
    return out


def _guest_table(mmu: KvmMmu, gfn: int) -> np.ndarray | None:
    slot = mmu.memslots.lookup(gfn)
    if slot is None:
        return None
    start = (gfn - slot.base_gfn) * 512
    return slot.backing.array[start:start + 512]


def _gpte_access(gptes: np.ndarray, nxe: bool) -> np.ndarray:
    access = gptes & _U(PT_WRITABLE_MASK | PT_USER_MASK)
    if nxe:
        return access | np.where((gptes & _U(PT64_NX_MASK)) != 0, _U(0), _U(ACC_EXEC_MASK))
    return access | _U(ACC_EXEC_MASK)


def _spte_access(sptes: np.ndarray) -> np.ndarray:
    access = sptes & _U(PT_WRITABLE_MASK | PT_USER_MASK)
    return access | np.where((sptes & _U(PT64_NX_MASK)) != 0, _U(0), _U(ACC_EXEC_MASK))


def check_translation(mmu: KvmMmu, sps: Iterable[ShadowPage], skip_gfn: int | None = None) -> list[str]:
    """Synced indirect pages mirror the guest's current tables (stale = a missed write).

    skip_gfn: a table the guest has just written and the MMU is about to update (the
    `pre pte write` point), which may legitimately be stale.
    """
    out: list[str] = []
    for sp in sps:
        if sp.direct or sp.unsync or sp.invalid or sp.gfn == skip_gfn:
            continue
        gptes = _guest_table(mmu, sp.gfn)
        if gptes is None:
            continue
        nxe = bool(sp.role & ROLE_NXE)
        row = sp.sptes
        present = np.flatnonzero((row & _PRESENT) != 0)
        if not len(present):
            continue
        g = gptes[present]
        s = row[present]
        gaccess = _gpte_access(g, nxe) & _U(sp.access)
        large = (g & _U(PT_PAGE_SIZE_MASK)) != 0
        if sp.level == 2:
            rsvd = np.where(large, _U(rsvd_bits(2, True, nxe)), _U(rsvd_bits(2, False, nxe)))
        else:
            rsvd = _U(rsvd_bits(sp.level, False, nxe))
        bad_gpte = ((g & _U(PT_PRESENT_MASK)) == 0) | ((g & rsvd) != 0)
        wp0 = not sp.role & ROLE_CR0_WP
        if sp.level == 1:
            bad_gpte |= (g & _U(PT_ACCESSED_MASK)) == 0
            want_gfn = (g & _U(PT64_BASE_ADDR_MASK)) >> _U(PAGE_SHIFT)
            got_gfn = sp._gfns_np[present]
            allowed = np.where((g & _U(PT_DIRTY_MASK)) != 0, gaccess, gaccess & ~_U(ACC_WRITE_MASK))
            got = _spte_access(s)
            excess = got & ~allowed
            if wp0:
                # CR0.WP=0: a supervisor-only writable spte for a read-only page.
                wp0_shape = (excess == _U(ACC_WRITE_MASK)) & ((got & _U(ACC_USER_MASK)) == 0)
                excess = np.where(wp0_shape, _U(0), excess)
            for k in np.flatnonzero(bad_gpte | (want_gfn != got_gfn) | (excess != 0)).tolist():
                out.append(
                    f"spte {int(s[k]):x} (sp {sp_address(sp)} level 1 index {int(present[k])}) "
                    f"does not match gpte {int(g[k]):x}\n"
                )
            continue
        for k in range(len(present)):
            gpte = int(g[k])
            child = mmu.child_of(int(s[k]))
            if bad_gpte[k]:
                ok = False
            elif large[k]:
                access = int(gaccess[k])
                if not gpte & PT_DIRTY_MASK:
                    access &= ~ACC_WRITE_MASK
                extra = child.access & ~access
                wp0_extra = wp0 and extra == ACC_WRITE_MASK and not child.access & ACC_USER_MASK
                ok = (
                    child.direct
                    and child.gfn == (gpte & PT64_LVL2_LARGE_ADDR_MASK) >> PAGE_SHIFT
                    and (not extra or wp0_extra)
                )
            else:
                ok = (
                    not child.direct
                    and child.gfn == (gpte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
                    and child.access == int(gaccess[k])
                )
            if not ok:
                out.append(
                    f"sp {sp_address(sp)} level {sp.level} index {int(present[k])} links "
                    f"{sp_address(child)} (gfn {child.gfn:x} access {child.access}) for gpte {gpte:x}\n"
                )
    return out


def check_write_tracking(mmu: KvmMmu, sps: Iterable[ShadowPage]) -> list[str]:
    out = []
    for sp in sps:
        if sp.level > 1 and not sp.direct and not mmu.is_obsolete_sp(sp):
            if not mmu.page_track_is_active(sp.gfn) and mmu.memslots.lookup(sp.gfn) is not None:
                out.append(f"upper-level table gfn {sp.gfn:x} (sp {sp_address(sp)}) is not write-tracked\n")
    return out


def check_dirty_log(mmu: KvmMmu, gfns: set[int] | None) -> list[str]:
    """Every page of a logged slot is dirty in the current bitmap or has no writable spte
    (kvm-mmu.md §12). Audit points never fall inside a harvest (it holds the MMU lock); a
    page a vCPU's fast page fault made writable but has not yet marked is in its window."""
    out = []
    pages = mmu.pool.pages
    in_flight = {v.fast_pf_gfn for v in mmu.vcpus}
    for slot in mmu.memslots:
        bitmap = slot.dirty_bitmap
        if bitmap is None:
            continue
        for gfn in slot.rmap if gfns is None else sorted(g for g in gfns if g in slot.rmap):
            rel = gfn - slot.base_gfn
            if int(bitmap[rel >> 6]) >> (rel & 63) & 1 or gfn in in_flight:
                continue
            for sptep in slot.rmap[gfn]:
                spte = pages[sptep >> 9].spt[sptep & 511]
                if spte & PT_WRITABLE_MASK:
                    out.append(f"dirty log: gfn {gfn:x} of slot {slot.id} is clean but spte "
                               f"{spte:x} is writable\n")
    return out


def extended_checks(
    mmu: KvmMmu, sps: list[ShadowPage], gfns: set[int] | None, skip_gfn: int | None = None
) -> list[str]:
    """mmud's checks over sps; rmaps of gfns only (None: every rmap)."""
    out = check_rmap_exact(mmu, sps, gfns)
    out += check_parent_links(mmu, sps)
    out += check_translation(mmu, sps, skip_gfn)
    out += check_write_tracking(mmu, sps)
    out += check_dirty_log(mmu, gfns)
    return out
