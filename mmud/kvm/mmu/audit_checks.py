"""The MMU audit's checks: the kernel's six (mmu_audit.c, ≤v5.17) and mmud's extended ones.

Each check returns message texts (without the `audit: (<point>) error: ` prefix, which the
audit adds). Kernel checks (exact texts):
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

The checks that look at single sptes come in two implementations of one protocol
(`CheckedEntries`): `audit_vector.PageArrays`, a few numpy operations over all pages at once
(the full audit: hundreds of pages), and `audit_scalar.PageEntries`, plain Python over the
handful of entries an incremental run looks at, where numpy's fixed cost per call would
dominate. Both give the same messages in the same order (tests/test_audit_paths.py);
`run_checks` puts them together with the page-level checks, which are shared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import numpy as np

from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.mmu import KvmMmu
from mmud.kvm.mmu.page import ShadowPage, sp_address, spte_index, sptep_page
from mmud.x86.paging import (
    PAGE_SHIFT,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
)

_U = np.uint64
_PRESENT = _U(S.SPTE_MMU_PRESENT)

Messages = dict[int, list[tuple[int, str]]]  # page row -> (entry, message) in entry order


class CheckedEntries(Protocol):
    """The sptes one run checks: all present entries of `sps`, or, for pages given a set of
    entries, the present ones of those; and the gfns whose rmaps it checks (None: all).
    Constructed as `(mmu, sps, gfns, entries=None)`."""

    sps: list[ShadowPage]

    def stages(self) -> Sequence[tuple[str, Callable[[], object]]]:
        """The work a run does before its checks, in named parts (a store point before each)."""

    def entry_reports(self, root_level: int) -> tuple[Messages, Messages]:
        """Checks 2 and 1 over every present leaf."""

    def rmap_exact(self) -> list[str]:
        """Leaves are in their rmap; rmap entries of the run's gfns are live leaves."""

    def translation(self, skip_gfn: int | None) -> list[str]:
        """Synced indirect pages mirror the guest's current tables."""

    def spte_bits(self) -> list[str]:
        """Every present leaf keeps W ⇒ MMU-writable ⇒ Host-writable."""


# --- message texts ------------------------------------------------------------------------------


def msg_no_memslot(gfn: int, i: int, sp: ShadowPage) -> list[str]:
    return [f"no memslot for gfn {gfn:x}\n", f"index {i} of sp (gfn={sp.gfn:x})\n"]


def msg_no_rmap(spte: int) -> str:
    return f"no rmap for writable spte {spte:x}\n"


def msg_mapping(root_level: int, pfn: int, spte: int) -> str:
    return f"levels {root_level} pfn {pfn:x} hpa {pfn << PAGE_SHIFT:x} ent {spte:x}n"


def msg_not_in_rmap(sp: ShadowPage, i: int, gfn: int) -> str:
    return f"spte {sp.spt[i]:x} (sp {sp_address(sp)} index {i} gfn {gfn:x}) is not in its rmap\n"


def msg_rmap_stale(gfn: int, sp: ShadowPage, i: int) -> str:
    return (
        f"rmap of gfn {gfn:x} holds sp {sp_address(sp)} index {i} spte {sp.spt[i]:x}, "
        "which does not map it\n"
    )


def msg_leaf_translation(sp: ShadowPage, i: int, spte: int, gpte: int) -> str:
    return f"spte {spte:x} (sp {sp_address(sp)} level 1 index {i}) does not match gpte {gpte:x}\n"


def msg_link(sp: ShadowPage, i: int, child: ShadowPage, gpte: int) -> str:
    return (
        f"sp {sp_address(sp)} level {sp.level} index {i} links "
        f"{sp_address(child)} (gfn {child.gfn:x} access {child.access}) for gpte {gpte:x}\n"
    )


def msg_spte_bits(sp: ShadowPage, i: int, spte: int) -> str:
    return (
        f"spte {spte:x} (sp {sp_address(sp)} index {i}) breaks "
        "W => MMU-writable => Host-writable\n"
    )


# --- shared per-entry facts ---------------------------------------------------------------------


# W => MMU-writable => Host-writable: the combinations of the three bits that keep it.
SPTE_BITS_MASK = PT_WRITABLE_MASK | S.SPTE_MMU_WRITEABLE | S.SPTE_HOST_WRITEABLE
SPTE_BITS_OK = (0, S.SPTE_HOST_WRITEABLE, S.SPTE_HOST_WRITEABLE | S.SPTE_MMU_WRITEABLE, SPTE_BITS_MASK)


def rows_of(sps: list[ShadowPage], wanted: list[ShadowPage]) -> list[int] | None:
    """The row in `sps` of each page of `wanted` (None if one is not there)."""
    try:
        return list(map(dict(zip(sps, range(len(sps)), strict=True)).__getitem__, wanted))
    except KeyError:
        return None


def inspect_spte_has_rmap(mmu: KvmMmu, sp: ShadowPage, i: int, gfn: int, spte: int) -> list[str]:
    """Check 2 for one present leaf."""
    slot = mmu.memslots.lookup(gfn)
    if slot is None:
        return msg_no_memslot(gfn, i, sp)
    return [] if slot.rmap.has(gfn) else [msg_no_rmap(spte)]


def in_own_rmap(mmu: KvmMmu, sp: ShadowPage, i: int, gfn: int) -> bool:
    """Whether entry i of sp is in the rmap of gfn."""
    slot = mmu.memslots.lookup(gfn)
    return slot is not None and sp.index << 9 | i in slot.rmap.get(gfn)


def gfn_order(gfn: np.ndarray, bad: np.ndarray) -> list[int]:
    """Positions where `bad` is set, in the rmaps' order (by gfn, then chain order) when
    `gfn` comes from Rmap.entries."""
    pos = np.flatnonzero(bad)
    return pos[np.argsort(gfn[pos], kind="stable")].tolist()


def translated_page(mmu: KvmMmu, sp: ShadowPage, skip_gfn: int | None) -> np.ndarray | None:
    """The guest table a synced indirect page mirrors now (None: nothing to compare).

    Obsolete pages (a fast zap has not freed them yet) are skipped: no vCPU reaches them,
    and kvm_mmu_pte_write(), which walks only valid pages, no longer follows their gptes."""
    if sp.direct or sp.unsync or mmu.is_obsolete_sp(sp) or sp.gfn == skip_gfn:
        return None
    slot = mmu.memslots.lookup(sp.gfn)
    if slot is None:
        return None
    start = (sp.gfn - slot.base_gfn) * 512
    return slot.backing.array[start : start + 512]


def add_message(msgs: Messages, row: int, entry: int, text: str) -> None:
    msgs.setdefault(row, []).append((entry, text))


# --- page-level checks ------------------------------------------------------------------------


def active_page_checks(mmu: KvmMmu, sps: list[ShadowPage], check2: Messages) -> list[str]:
    """Checks 5 (check_mappings_rmap) and 6 (audit_write_protection), page by page."""
    out: list[str] = []
    for row, sp in enumerate(sps):
        if row in check2 and sp.level == 1:  # at level 1 every present spte is a leaf
            out += [text for _, text in check2[row]]
        if not sp.direct:  # audit_write_protection() has nothing to say of direct pages
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
        if pages[sptep_page(sptep)].spt[spte_index(sptep)] & PT_WRITABLE_MASK:
            out.append(f"shadow page has writable mappings: gfn {sp.gfn:x} role {sp.role:x}\n")
    return out


def walk_checks(
    sps: list[ShadowPage],
    rows: list[int],
    check3: Messages,
    check1: Messages,
    point: str,
    synced: set[ShadowPage] | None = None,
) -> list[str]:
    """Checks 3, 1 and 4 for each entry of each page reached from the root (`rows` of `sps`,
    in walk order).

    Per entry the kernel calls 3, 1, 4; here the messages of one page are grouped by check
    (entry order within each). Check 4 applies to the pages the sync just walked: `synced`,
    or every page if None.
    """
    post_sync = point == "post sync"
    out: list[str] = []
    # Nothing to say of a synced page without messages: usually every page.
    for row in [row for row in rows if sps[row].unsync or row in check3 or row in check1]:
        sp = sps[row]
        out += [text for _, text in check3.get(row, ())]
        if sp.unsync and sp.level != 1:
            out += [f"unsync sp: {sp_address(sp)} level = {sp.level}\n"] * 512
        else:
            out += [text for _, text in check1.get(row, ())]
        if post_sync and sp.unsync and (synced is None or sp in synced):
            out += [f"meet unsync sp({sp_address(sp)}) after sync root.\n"] * 512
    return out


def links(sp: ShadowPage) -> tuple[list[int], list[int]]:
    """The entries of sp that link a child page, and the pool index of each child
    (spte_child_index() of each spte, at once)."""
    row = sp.sptes
    entries = np.flatnonzero(_nonleaf(row))
    return entries.tolist(), S.spte_child_indices(row[entries]).tolist()


def _nonleaf(sptes: np.ndarray) -> np.ndarray:
    """Which sptes are present and link a child page."""
    return (sptes & _U(S.SPTE_MMU_PRESENT | PT_PAGE_SIZE_MASK)) == _PRESENT


def children(mmu: KvmMmu, sp: ShadowPage) -> list[ShadowPage]:
    """The shadow pages sp's present non-leaf sptes point at, in entry order."""
    pages = mmu.pool.pages
    return [pages[c] for c in links(sp)[1]]


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
            todo.extend(pages[sptep_page(p)] for p in page.parent_ptes)
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


def check_parent_links(mmu: KvmMmu, sps: Sequence[ShadowPage]) -> list[str]:
    out: list[str] = []
    suspects, links_checked = _link_suspects(mmu, sps)
    for sp in suspects:
        out += _parent_links(mmu, sp, links_checked)
    return out


def _parent_links(mmu: KvmMmu, sp: ShadowPage, links_checked: bool) -> list[str]:
    """parent_links of one page: its parent_ptes, its unsync_children, its own links (unless
    the links were checked as a whole: then nothing is wrong with them)."""
    out: list[str] = []
    pages = mmu.pool.pages
    if sp.unsync_children != sp.unsync_child_bitmap.bit_count():
        out.append(
            f"sp {sp_address(sp)} unsync_children {sp.unsync_children} "
            f"but {sp.unsync_child_bitmap.bit_count()} bits\n"
        )
    for sptep in sp.parent_ptes:
        parent, i = pages[sptep_page(sptep)], spte_index(sptep)
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
    if sp.level == 1 or links_checked:
        return out
    for i, c in zip(*links(sp), strict=True):
        child = pages[c]
        if (sp.index << 9 | i) not in child.parent_ptes:
            out.append(
                f"sp {sp_address(sp)} index {i} points at {sp_address(child)}, "
                "which does not list it as parent\n"
            )
    return out


LINKS_AS_A_WHOLE = 64  # fewer pages: numpy's fixed costs make the check of the whole dearer


def _link_suspects(mmu: KvmMmu, sps: Sequence[ShadowPage]) -> tuple[Sequence[ShadowPage], bool]:
    """The pages of sps that _parent_links may have something to say of, in order, and
    whether their links were checked as a whole.

    All of them, unless sps are every active page (a full run). Then the links are checked
    as a whole first: if the parent_ptes entries of all pages are distinct, each names a
    present non-leaf spte of an active upper-level page that points at the page listing it,
    and they are as many as those pages' links, then they are all the links, each listed by
    the page it points at. What is left to check page by page is the unsync marks and counts.
    """
    active = mmu.active_mmu_pages
    if len(sps) < LINKS_AS_A_WHOLE or len(sps) != len(active) or not all(map(active.__contains__, sps)):
        return sps, False
    parents = mmu.pool.parent_ptes  # every page's parent_ptes head, by pool index
    listed = np.zeros(len(parents.head), dtype=bool)
    listed[[sp.index for sp in sps]] = True
    parent_spteps, owner = parents.entries(listed)
    upper = [sp for sp in sps if sp.level > 1]
    rows = np.stack([sp.sptes for sp in upper]) if upper else np.zeros((0, 512), dtype=np.uint64)
    # The row of rows holding each parent pte (-1: it is not in an upper-level page of sps).
    row_of = np.full(len(mmu.pool.pages), -1, dtype=np.int64)
    row_of[[sp.index for sp in upper]] = np.arange(len(upper))
    at = row_of[sptep_page(parent_spteps)]
    whole = (
        len(parent_spteps) == np.count_nonzero(_nonleaf(rows))
        and bool(np.all(np.diff(np.sort(parent_spteps)) != 0))  # distinct
        and bool((at >= 0).all())
    )
    if whole:
        spte = rows[at, spte_index(parent_spteps)]
        whole = bool(_nonleaf(spte).all()) and np.array_equal(S.spte_child_indices(spte), owner)
    if not whole:
        return sps, False
    return [sp for sp in sps if sp.unsync or sp.unsync_children or sp.unsync_child_bitmap], True


def check_write_tracking(mmu: KvmMmu, sps: Iterable[ShadowPage]) -> list[str]:
    out = []
    for sp in sps:
        if sp.level > 1 and not sp.direct and not mmu.is_obsolete_sp(sp):
            if not mmu.page_track_is_active(sp.gfn) and mmu.memslots.lookup(sp.gfn) is not None:
                out.append(
                    f"upper-level table gfn {sp.gfn:x} (sp {sp_address(sp)}) is not write-tracked\n"
                )
    return out


def spte_values(mmu: KvmMmu, sptep: np.ndarray) -> np.ndarray:
    """The sptes at `sptep` (pool index << 9 | entry)."""
    if len(sptep) < 64:
        pages = mmu.pool.pages
        return np.fromiter((pages[sptep_page(p)].spt[spte_index(p)] for p in sptep.tolist()),
                           dtype=np.uint64, count=len(sptep))
    # From each of the pool's chunks in turn: joining them first would copy them all.
    chunks = mmu.pool.spt_chunks
    per = chunks[0].size
    which = sptep // per
    out = np.empty(len(sptep), dtype=np.uint64)
    for c in np.unique(which).tolist():
        sel = which == c
        out[sel] = chunks[c].reshape(-1)[sptep[sel] - c * per]
    return out


def check_dirty_log(mmu: KvmMmu, gfns: set[int] | None) -> list[str]:
    """Every page of a logged slot is dirty in the current bitmap or has no writable spte
    (docs/dirty-logging.md). Audit points never fall inside a harvest (it holds the MMU lock); a
    page a vCPU's fast page fault made writable but has not yet marked is in its window."""
    out = []
    in_flight = np.array([v.fast_pf_gfn for v in mmu.vcpus if v.fast_pf_gfn is not None], dtype=np.int64)
    for slot in mmu.memslots:
        bitmap = slot.dirty_bitmap
        if bitmap is None:
            continue
        select = None
        if gfns is not None:
            select = np.zeros(slot.npages, dtype=bool)
            select[[g - slot.base_gfn for g in gfns if slot.base_gfn <= g < slot.end_gfn]] = True
        sptep, gfn = slot.rmap.entries(select)
        rel = gfn - slot.base_gfn
        dirty = (bitmap[rel >> 6] >> (rel & 63).astype(np.uint64)) & _U(1)
        writable = (spte_values(mmu, sptep) & _U(PT_WRITABLE_MASK)) != 0
        bad = (dirty == 0) & writable & ~np.isin(gfn, in_flight)
        for k in gfn_order(gfn, bad):
            out.append(
                f"dirty log: gfn {int(gfn[k]):x} of slot {slot.id} is clean but spte "
                f"{mmu.sptep_to_sp(int(sptep[k])).spt[spte_index(int(sptep[k]))]:x} is writable\n"
            )
    return out


def run_checks(
    mmu: KvmMmu,
    checked: CheckedEntries,
    tree: CheckedEntries,
    tree_rows: list[int],
    point: str,
    root_level: int,
    gfns: set[int] | None,
    synced: set[ShadowPage] | None,
    skip_gfn: int | None,
    linked: list[ShadowPage],
    go_on: Callable[[str], bool] = lambda check: True,
) -> list[str] | None:
    """One run: the active-page checks over `checked`, the walk checks over `tree_rows` of
    `tree` (which may be `checked` itself), the extended checks over `checked` — rmaps of
    gfns only (None: every rmap) — and the link checks over `linked`.

    `go_on(check)` is asked before each check: a parameter store may land there
    (docs/audit.md), and if it says stop, the run ends without a result (None)."""
    for stage, work in checked.stages():
        if not go_on(stage):
            return None
        work()
    if not go_on("entry_reports"):
        return None
    check2, check1 = checked.entry_reports(root_level)
    if not go_on("walk entry_reports"):
        return None
    check3, check1_tree = (check2, check1) if tree is checked else tree.entry_reports(root_level)
    parts: tuple[tuple[str, Callable[[], list[str]]], ...] = (
        ("check_mappings_rmap", lambda: active_page_checks(mmu, checked.sps, check2)),
        ("audit_sptes_have_rmaps",
         lambda: walk_checks(tree.sps, tree_rows, check3, check1_tree, point, synced)),
        ("rmap_exact", checked.rmap_exact),
        ("parent_links", lambda: check_parent_links(mmu, linked)),
        ("translation", lambda: checked.translation(skip_gfn)),
        ("spte_bits", checked.spte_bits),
        ("write_tracking", lambda: check_write_tracking(mmu, linked)),
        ("dirty_log", lambda: check_dirty_log(mmu, gfns)),
    )
    out: list[str] = []
    for check, part in parts:
        if not go_on(check):
            return None
        out += part()
    return out
