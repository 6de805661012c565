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
  spte_bits        every present leaf keeps W ⇒ MMU-writable ⇒ Host-writable
  dirty_log        every page of a logged slot is dirty in its bitmap or not writable
"""

from __future__ import annotations

from collections.abc import Iterable
import numpy as np

from mmud.kvm.memslot import Memslot
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.mmu import KvmMmu
from mmud.kvm.mmu.page import CHUNK_PAGES, ROLE_CR0_WP, ROLE_NXE, ShadowPage, sp_address
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


Messages = dict[int, list[tuple[int, str]]]  # page row -> (entry, message) in the order found


class PageArrays:
    """The sptes of a list of shadow pages as 2-D arrays (a row per page), gathered once per
    run, so that every check is a few numpy operations over all pages at once."""

    def __init__(
        self, mmu: KvmMmu, sps: list[ShadowPage], entries: list[set[int] | None] | None = None
    ) -> None:
        n = len(sps)
        self.sps = sps
        empty = np.zeros((0, 512), dtype=np.uint64)
        self.sptes = np.stack([sp.sptes for sp in sps]) if n else empty
        gfns = np.stack([sp._gfns_np for sp in sps]) if n else empty
        self.level = np.array([sp.level for sp in sps], dtype=np.int64)
        direct = np.array([sp.direct for sp in sps], dtype=bool)
        base = np.array([sp.gfn for sp in sps], dtype=np.uint64)
        index = np.array([sp.index for sp in sps], dtype=np.int64)
        shift = ((self.level - 1) * 9).astype(np.uint64)
        self.gfns = np.where(direct[:, None], base[:, None] + (_IDX[None, :] << shift[:, None]), gfns)
        self.sptep = (index[:, None] << 9) | _IDX[None, :].astype(np.int64)
        self.present = (self.sptes & _PRESENT) != 0
        self.leaf = self.present & (
            (self.level[:, None] == 1) | ((self.sptes & _U(PT_PAGE_SIZE_MASK)) != 0)
        )
        if entries is not None and any(e is not None for e in entries):
            # Only the entries an operation changed: the per-entry checks look at those.
            wanted = np.ones((n, 512), dtype=bool)
            for row, chosen in enumerate(entries):
                if chosen is not None:
                    wanted[row] = False
                    wanted[row, list(chosen)] = True
            self.present &= wanted
            self.leaf &= wanted
        self._rmap_reports: Messages | None = None

    def rmap_reports(self, rmaps: RmapIndex) -> Messages:
        """Check 2 over every present leaf, computed once (checks 3 and 5 both need it)."""
        if self._rmap_reports is None:
            self._rmap_reports = inspect_sptes_have_rmap(rmaps, self, self.leaf)
        return self._rmap_reports


class RmapIndex:
    """Which gfns have a non-empty level-1 rmap: dict lookups for a few gfns, a per-slot mask
    (built once per run, on first need) for many."""

    _MASK_FROM = 256

    def __init__(self, mmu: KvmMmu) -> None:
        self.mmu = mmu
        self._masks: dict[int, np.ndarray] = {}

    def has_rmap(self, slot: Memslot, gfns: np.ndarray) -> np.ndarray:
        if len(gfns) < self._MASK_FROM:
            has = slot.rmap.has
            return np.fromiter(map(has, gfns.tolist()), dtype=bool, count=len(gfns))
        mask = self._masks.get(slot.id)
        if mask is None:
            mask = self._masks[slot.id] = slot.rmap.mapped()
        return mask[(gfns - _U(slot.base_gfn)).astype(np.int64)]


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




def _add(msgs: Messages, row: int, entry: int, text: str) -> None:
    msgs.setdefault(row, []).append((entry, text))


def inspect_sptes_have_rmap(rmaps: RmapIndex, pa: PageArrays, mask: np.ndarray) -> Messages:
    """Check 2 for the entries of mask (present leaves), grouped by page row, entry order."""
    rows, entries = np.nonzero(mask)
    gfns = pa.gfns[rows, entries]
    found: list[tuple[int, int, list[str]]] = []
    for slot, pos in _slot_split(rmaps.mmu, gfns):
        if slot is None:
            for p in pos.tolist():
                sp = pa.sps[int(rows[p])]
                found.append(
                    (
                        int(rows[p]),
                        int(entries[p]),
                        [
                            f"no memslot for gfn {int(gfns[p]):x}\n",
                            f"index {int(entries[p])} of sp (gfn={sp.gfn:x})\n",
                        ],
                    )
                )
            continue
        for p in pos[~rmaps.has_rmap(slot, gfns[pos])].tolist():
            spte = int(pa.sptes[rows[p], entries[p]])
            found.append((int(rows[p]), int(entries[p]), [f"no rmap for writable spte {spte:x}\n"]))
    msgs: Messages = {}
    for row, entry, texts in sorted(found, key=lambda f: (f[0], f[1])):
        for text in texts:
            _add(msgs, row, entry, text)
    return msgs


def active_page_checks(mmu: KvmMmu, rmaps: RmapIndex, pa: PageArrays) -> list[str]:
    """Checks 5 (check_mappings_rmap) and 6 (audit_write_protection), page by page."""
    check2 = pa.rmap_reports(rmaps)  # at level 1 every present spte is a leaf
    out: list[str] = []
    for row, sp in enumerate(pa.sps):
        if sp.level == 1:
            out += [text for _, text in check2.get(row, ())]
        out += audit_write_protection(mmu, sp)
    return out


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
    for sptep in slot.rmap.get(sp.gfn):
        if pages[sptep >> 9].spt[sptep & 0x1FF] & PT_WRITABLE_MASK:
            out.append(f"shadow page has writable mappings: gfn {sp.gfn:x} role {sp.role:x}\n")
    return out


def walk_checks(
    mmu: KvmMmu,
    rmaps: RmapIndex,
    pa: PageArrays,
    point: str,
    root_level: int,
    synced: set[ShadowPage] | None = None,
) -> list[str]:
    """Checks 3, 1 and 4 for each entry of each page reached from the root, in that order.

    Per entry the kernel calls 3, 1, 4; here the messages of one page are grouped by check
    (entry order within each). Check 4 applies to the pages the sync just walked: `synced`,
    or every page if None.
    """
    check3 = pa.rmap_reports(rmaps)
    check1: Messages = {}
    rows, entries = np.nonzero(pa.leaf)
    gfns = pa.gfns[rows, entries]
    for slot, pos in _slot_split(mmu, gfns):
        if slot is None:
            continue
        want = (gfns[pos] - _U(slot.base_gfn) + _U(slot.backing.base_pfn)) << _U(PAGE_SHIFT)
        got = pa.sptes[rows[pos], entries[pos]]
        for k in np.flatnonzero((got & _ADDR) != want).tolist():
            pfn = int(want[k]) >> PAGE_SHIFT
            _add(
                check1,
                int(rows[pos[k]]),
                int(entries[pos[k]]),
                f"levels {root_level} pfn {pfn:x} hpa {pfn << PAGE_SHIFT:x} ent {int(got[k]):x}n",
            )
    post_sync = point == "post sync"
    out: list[str] = []
    for row, sp in enumerate(pa.sps):
        out += [text for _, text in check3.get(row, ())]
        if sp.unsync and sp.level != 1:
            out += [f"unsync sp: {sp_address(sp)} level = {sp.level}\n"] * 512
        else:
            out += [text for _, text in sorted(check1.get(row, ()))]
        if post_sync and sp.unsync and (synced is None or sp in synced):
            out += [f"meet unsync sp({sp_address(sp)}) after sync root.\n"] * 512
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


def _rmap_arrays(mmu: KvmMmu, gfns: Iterable[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(sptep, gfn) of every level-1 rmap entry of gfns (None: all), as int64 arrays."""
    sptes: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    for slot in mmu.memslots:
        if gfns is None:
            part = slot.rmap.entries()
        else:
            select = np.zeros(slot.npages, dtype=bool)
            inside = [g - slot.base_gfn for g in gfns if slot.base_gfn <= g < slot.end_gfn]
            select[inside] = True
            part = slot.rmap.entries(select)
        sptes.append(part[0])
        keys.append(part[1])
    if not sptes:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(sptes), np.concatenate(keys)


def _live_leaf_gfns(mmu: KvmMmu, sptep: np.ndarray) -> np.ndarray:
    """For each sptep: the gfn its spte maps if it is a present leaf of an active page, else -1."""
    pages = mmu.pool.pages
    active = mmu.active_mmu_pages
    uniq, inverse = np.unique(sptep >> 9, return_inverse=True)
    sps = [pages[k] for k in uniq.tolist()]
    n = len(sps)
    is_active = np.fromiter((sp in active for sp in sps), dtype=bool, count=n)[inverse]
    level = np.fromiter((sp.level for sp in sps), dtype=np.int64, count=n)[inverse]
    direct = np.fromiter((sp.direct for sp in sps), dtype=bool, count=n)[inverse]
    base = np.fromiter((sp.gfn for sp in sps), dtype=np.int64, count=n)[inverse]
    idx, i = sptep >> 9, sptep & 0x1FF
    spte = np.zeros(len(sptep), dtype=np.uint64)
    mapped = np.zeros(len(sptep), dtype=np.int64)
    chunk, row = idx // CHUNK_PAGES, idx % CHUNK_PAGES
    for k in np.unique(chunk).tolist():
        sel = chunk == k
        spte[sel] = mmu.pool.spt_chunks[k][row[sel], i[sel]]
        mapped[sel] = mmu.pool.gfn_chunks[k][row[sel], i[sel]].astype(np.int64)
    mapped = np.where(direct, base + (i << (9 * (level - 1))), mapped)
    leaf = (level == 1) | ((spte & _U(PT_PAGE_SIZE_MASK)) != 0)
    live = is_active & ((spte & _PRESENT) != 0) & leaf
    return np.where(live, mapped, -1)


def _pair_keys(sptep: np.ndarray, gfn: np.ndarray) -> np.ndarray:
    """One uint64 per (sptep, gfn): gfns are below 2^34 (MAXPHYADDR 46), sptep below 2^30."""
    return (sptep.astype(np.uint64) << _U(34)) | gfn.astype(np.uint64)


def check_rmap_exact(mmu: KvmMmu, pa: PageArrays, gfns: set[int] | None) -> list[str]:
    """Leaf sptes of the pages are in their rmap; rmap entries (of gfns, or all) are live leaves."""
    out: list[str] = []
    pages = mmu.pool.pages
    leaf_sptep, leaf_gfn = pa.sptep[pa.leaf], pa.gfns[pa.leaf].astype(np.int64)
    wanted = None if gfns is None else set(gfns) | set(leaf_gfn.tolist())
    r_sptep, r_gfn = _rmap_arrays(mmu, wanted)
    rmap_keys = np.sort(_pair_keys(r_sptep, r_gfn))
    leaf_keys = _pair_keys(leaf_sptep, leaf_gfn)
    pos = np.minimum(np.searchsorted(rmap_keys, leaf_keys), max(len(rmap_keys) - 1, 0))
    found = rmap_keys[pos] == leaf_keys if len(rmap_keys) else np.zeros(len(leaf_keys), dtype=bool)
    for k in np.flatnonzero(~found).tolist():
        sptep, gfn = int(leaf_sptep[k]), int(leaf_gfn[k])
        sp, i = pages[sptep >> 9], sptep & 0x1FF
        out.append(
            f"spte {sp.spt[i]:x} (sp {sp_address(sp)} index {i} gfn {gfn:x}) is not in its rmap\n"
        )
    if gfns is not None:
        keep = np.isin(r_gfn, np.fromiter(gfns, dtype=np.int64, count=len(gfns)))
        r_sptep, r_gfn = r_sptep[keep], r_gfn[keep]
    bad = _live_leaf_gfns(mmu, r_sptep) != r_gfn
    for k in np.flatnonzero(bad).tolist():
        sptep, gfn = int(r_sptep[k]), int(r_gfn[k])
        sp, i = pages[sptep >> 9], sptep & 0x1FF
        out.append(
            f"rmap of gfn {gfn:x} holds sp {sp_address(sp)} index {i} spte {sp.spt[i]:x}, "
            "which does not map it\n"
        )
    return out


def check_parent_links(mmu: KvmMmu, sps: Iterable[ShadowPage]) -> list[str]:
    out: list[str] = []
    pages = mmu.pool.pages
    for sp in sps:
        if sp.unsync_children != sp.unsync_child_bitmap.bit_count():
            out.append(
                f"sp {sp_address(sp)} unsync_children {sp.unsync_children} "
                f"but {sp.unsync_child_bitmap.bit_count()} bits\n"
            )
        for sptep in sp.parent_ptes:
            parent, i = pages[sptep >> 9], sptep & 0x1FF
            spte = parent.spt[i]
            if not spte & S.SPTE_MMU_PRESENT or S.spte_child_index(spte) != sp.index:
                out.append(
                    f"sp {sp_address(sp)} lists parent {sp_address(parent)} index {i}, "
                    "which does not point at it\n"
                )
            elif (sp.unsync or sp.unsync_children) and not parent.unsync_child_bitmap >> i & 1:
                out.append(
                    f"sp {sp_address(sp)} is unsync below {sp_address(parent)} index {i} "
                    "but the bit is clear\n"
                )
        if sp.level == 1:
            continue
        row = sp.sptes
        for i in np.flatnonzero(
            ((row & _PRESENT) != 0) & ((row & _U(PT_PAGE_SIZE_MASK)) == 0)
        ).tolist():
            child = mmu.child_of(sp.spt[i])
            if (sp.index << 9 | i) not in child.parent_ptes:
                out.append(
                    f"sp {sp_address(sp)} index {i} points at {sp_address(child)}, "
                    "which does not list it as parent\n"
                )
    return out


def _guest_table(mmu: KvmMmu, gfn: int) -> np.ndarray | None:
    slot = mmu.memslots.lookup(gfn)
    if slot is None:
        return None
    start = (gfn - slot.base_gfn) * 512
    return slot.backing.array[start : start + 512]


def _gpte_access(gptes: np.ndarray, nxe: bool) -> np.ndarray:
    access = gptes & _U(PT_WRITABLE_MASK | PT_USER_MASK)
    if nxe:
        return access | np.where((gptes & _U(PT64_NX_MASK)) != 0, _U(0), _U(ACC_EXEC_MASK))
    return access | _U(ACC_EXEC_MASK)


def _spte_access(sptes: np.ndarray) -> np.ndarray:
    access = sptes & _U(PT_WRITABLE_MASK | PT_USER_MASK)
    return access | np.where((sptes & _U(PT64_NX_MASK)) != 0, _U(0), _U(ACC_EXEC_MASK))


def check_translation(mmu: KvmMmu, pa: PageArrays, skip_gfn: int | None = None) -> list[str]:
    """Synced indirect pages mirror the guest's current tables (stale = a missed write).

    skip_gfn: a table the guest has just written and the MMU is about to update (the
    `pre pte write` point), which may legitimately be stale.
    """
    out: list[str] = []
    for r, sp in enumerate(pa.sps):
        if sp.direct or sp.unsync or sp.invalid or sp.gfn == skip_gfn:
            continue
        gptes = _guest_table(mmu, sp.gfn)
        if gptes is None:
            continue
        nxe = bool(sp.role & ROLE_NXE)
        row = sp.sptes
        present = np.flatnonzero(pa.present[r])
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


def check_spte_bits(pa: PageArrays) -> list[str]:
    """Every present leaf keeps W ⇒ MMU-writable ⇒ Host-writable (spte.py)."""
    sptes = pa.sptes
    w = (sptes & _U(PT_WRITABLE_MASK)) != 0
    mmu_w = (sptes & _U(S.SPTE_MMU_WRITEABLE)) != 0
    host_w = (sptes & _U(S.SPTE_HOST_WRITEABLE)) != 0
    bad = pa.leaf & ((w & ~mmu_w) | (mmu_w & ~host_w))
    out = []
    for row, i in zip(*np.nonzero(bad), strict=True):
        sp = pa.sps[int(row)]
        out.append(
            f"spte {int(sptes[row, i]):x} (sp {sp_address(sp)} index {int(i)}) breaks "
            "W => MMU-writable => Host-writable\n"
        )
    return out


def check_write_tracking(mmu: KvmMmu, sps: Iterable[ShadowPage]) -> list[str]:
    out = []
    for sp in sps:
        if sp.level > 1 and not sp.direct and not mmu.is_obsolete_sp(sp):
            if not mmu.page_track_is_active(sp.gfn) and mmu.memslots.lookup(sp.gfn) is not None:
                out.append(
                    f"upper-level table gfn {sp.gfn:x} (sp {sp_address(sp)}) is not write-tracked\n"
                )
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
        mapped = (np.flatnonzero(slot.rmap.mapped()) + slot.base_gfn).tolist() if gfns is None else sorted(
            g for g in gfns if slot.base_gfn <= g < slot.end_gfn and slot.rmap.has(g))
        for gfn in mapped:
            rel = gfn - slot.base_gfn
            if int(bitmap[rel >> 6]) >> (rel & 63) & 1 or gfn in in_flight:
                continue
            for sptep in slot.rmap.get(gfn):
                spte = pages[sptep >> 9].spt[sptep & 511]
                if spte & PT_WRITABLE_MASK:
                    out.append(
                        f"dirty log: gfn {gfn:x} of slot {slot.id} is clean but spte "
                        f"{spte:x} is writable\n"
                    )
    return out


def extended_checks(
    mmu: KvmMmu,
    pa: PageArrays,
    gfns: set[int] | None,
    skip_gfn: int | None = None,
    linked: list[ShadowPage] | None = None,
) -> list[str]:
    """mmud's checks over the pages; rmaps of gfns only (None: every rmap); the link checks
    over `linked` (default: the pages)."""
    sps = pa.sps
    linked = sps if linked is None else linked
    out = check_rmap_exact(mmu, pa, gfns)
    out += check_parent_links(mmu, linked)
    out += check_translation(mmu, pa, skip_gfn)
    out += check_spte_bits(pa)
    out += check_write_tracking(mmu, linked)
    out += check_dirty_log(mmu, gfns)
    return out
