"""The full audit's pass over the pages (audit_vector.PageArrays: the pages in blocks, the
rmap heads read at the leaves' gfns, chains and the reverse direction of rmap_exact looked at
only when that finds something) gives the messages of the entry-by-entry checks
(audit_scalar.PageEntries): with the pool in many chunks and the pages in many blocks, on a
guest with RAM on both sides of the PCI hole (two memslots), with each bug armed and with
damage no bug does; a stretch of pages checked at once reports, when an entry in it is
spoilt, what entry by entry does, and so does a block of upper-level pages; and the parent
links checked as a whole in a full run report what the check page by page does."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import mmud
from mmud.campaign.kinds.overhead import touched_vm
from mmud.campaign.zap_guest import DIRECT_VA
from mmud.kvm.mmu import audit_checks as C
from mmud.kvm.mmu import audit_vector, page
from mmud.kvm.mmu import spte as S
from mmud.sched import TaskFailed
from tests.test_audit_paths import DAMAGE, MMU_BUGS, NO_MEMSLOT_GFN, _both, _damage


def _full_runs_agree(vm: mmud.VM) -> list[str]:
    """A full run both ways at both kinds of point; the messages at `post page fault`."""
    mmu = vm.mmu
    pages = list(reversed(mmu.active_mmu_pages))
    tree = [sp for v in mmu.vcpus if v.root is not None for sp in C.reachable_pages(mmu, v.root)]
    found = {}
    for point in ("post page fault", "post sync"):
        vector, scalar = _both(mmu, point, pages, tree, None)
        assert vector == scalar
        found[point] = vector
    return found["post page fault"]


@pytest.mark.parametrize("bug", [None, *MMU_BUGS])
def test_pass_in_blocks_over_two_memslots_matches_entry_by_entry(monkeypatch, bug):
    monkeypatch.setattr(page, "CHUNK_PAGES", 16)  # the pool in many chunks
    monkeypatch.setattr(audit_vector, "BLOCK_ROWS", 7)  # blocks that straddle chunks
    vm = mmud.VM(mem_mb=4096, seed=3, workload="kernel")
    assert len(vm.ram_ranges) == 2
    rng = np.random.default_rng(3)
    vm.step(300)
    # Leaves on both sides of the hole, next to each slot's ends among them.
    for start, stop in vm.ram_ranges:
        spots = rng.integers(start >> 12, stop >> 12, size=6) << 12
        for gpa in (start, stop - 4096, *spots.tolist()):
            vm.vcpus[0].read_u64(DIRECT_VA + gpa)
    assert len(vm.mmu.active_mmu_pages) > 3 * 16
    vm.inject(bug or "none")
    try:
        vm.step(300)
    except TaskFailed:  # the bug broke the guest kernel; the MMU state is still there
        pass
    found = _full_runs_agree(vm)
    if bug is None:
        assert found == []
    pages = list(reversed(vm.mmu.active_mmu_pages))
    present = [(sp, i) for sp in pages for i in range(512) if sp.spt[i] & S.SPTE_MMU_PRESENT]
    indirect = [(sp, i) for sp, i in present if sp.level == 1 and not sp.direct]  # recorded gfns
    for damage in DAMAGE:
        for candidates in (present, indirect):
            for k in rng.choice(len(candidates), size=min(2, len(candidates)), replace=False):
                _damage(vm, *candidates[int(k)], damage)
        _full_runs_agree(vm)


def test_a_gfn_outside_every_memslot_is_not_read_from_a_slots_rmap():
    """A leaf whose gfn lies beyond its slot is not in that slot's rmap, even when the
    head the pass reads at the slot's edge (numpy's clipped index) holds its sptep."""
    vm = mmud.VM(mem_mb=64, seed=3, workload="kernel")
    vm.step(300)
    mmu = vm.mmu
    sp, i = next((sp, i) for sp in mmu.active_mmu_pages if sp.level == 1 and not sp.direct
                 for i in range(512) if sp.spt[i] & S.SPTE_MMU_PRESENT)
    sptep, gfn = sp.index << 9 | i, sp.gfn_of(i)
    slot = mmu.memslots.lookup(gfn)
    assert slot is not None
    last = slot.base_gfn + slot.npages - 1
    assert slot.rmap.remove(gfn, sptep)
    for other in list(slot.rmap.get(last)):
        slot.rmap.remove(last, other)
    slot.rmap.add(last, sptep)
    sp.gfns[i] = last + 1 if mmu.memslots.lookup(last + 1) is None else NO_MEMSLOT_GFN
    found = _full_runs_agree(vm)
    assert any(m.startswith("no memslot for gfn") for m in found)


def test_an_unregistered_leaf_and_a_stale_rmap_entry_are_both_found():
    """The reverse direction of rmap_exact runs when the forward one finds a leaf missing
    from its rmap, and when the rmaps hold more entries than there are leaves."""
    vm = mmud.VM(mem_mb=64, seed=3, workload="kernel")
    vm.step(300)
    mmu = vm.mmu
    sp = next(sp for sp in reversed(mmu.active_mmu_pages) if sp.level == 1 and sp.sptes.any())
    i = int(np.flatnonzero(sp.sptes & np.uint64(S.SPTE_MMU_PRESENT))[0])
    gfn = sp.gfn_of(i)
    slot = mmu.memslots.lookup(gfn)
    assert slot is not None
    assert slot.rmap.remove(gfn, sp.index << 9 | i)
    assert any("is not in its rmap" in m for m in _full_runs_agree(vm))
    slot.rmap.add(gfn, sp.index << 9 | i)
    assert _full_runs_agree(vm) == []
    slot.rmap.add(gfn + 1, sp.index << 9 | i)  # an entry that does not map gfn + 1
    assert any("which does not map it" in m for m in _full_runs_agree(vm))


STRETCH_DAMAGE = (S.SPTE_MMU_WRITEABLE, S.SPTE_HOST_WRITEABLE, 1 << 12, 1 << 40, "present", "rmap",
                  "head", "head and frame")


@pytest.mark.parametrize("damage", STRETCH_DAMAGE)
def test_a_stretch_checked_at_once_reports_what_entry_by_entry_does(damage):
    """A guest that read its RAM in order has stretches of direct level-1 pages (consecutive
    pool rows mapping consecutive gfns), each checked with a few operations over all its
    entries; an entry spoilt inside one (its flags, its frame, its presence, its rmap head, a second
    rmap entry, or both the head and the frame those of the next entry) sends the piece to the
    general pass, which reports what the scalar checks do."""
    vm = touched_vm(64)
    mmu = vm.mmu
    pages = list(reversed(mmu.active_mmu_pages))
    arrays = audit_vector.PageArrays(mmu, pages, None)
    assert arrays._stretched >= audit_vector.MIN_STRETCH
    sp = pages[int(arrays._order[arrays._stretched // 2])]
    i = 100
    sptep, gfn = sp.index << 9 | i, sp.gfn_of(i)
    assert sp.spt[i] & S.SPTE_MMU_PRESENT and sp.level == 1 and sp.direct
    assert _full_runs_agree(vm) == []
    slot = mmu.memslots.lookup(gfn)
    assert slot is not None
    if damage == "present":
        sp.spt[i] &= ~S.SPTE_MMU_PRESENT
    elif damage == "rmap":
        slot.rmap.add(gfn + 1, sptep)
    elif damage in ("head", "head and frame"):  # the head holds the next entry's sptep
        assert slot.rmap.remove(gfn, sptep)
        slot.rmap.add(gfn, sptep + 1)
        if damage == "head and frame":  # and the spte the next gfn's frame
            sp.spt[i] += 1 << 12
    else:
        sp.spt[i] ^= damage
    assert _full_runs_agree(vm) != []


def test_the_rmaps_entries_are_counted_without_the_heads_the_pass_found_single():
    """To know whether the rmaps hold only the leaves, a full run counts their entries without
    reading again the heads of the stretches' clean pieces (one entry each); a stale entry at
    a gfn of no stretch is still found."""
    vm = touched_vm(64)
    mmu = vm.mmu
    arrays = audit_vector.PageArrays(mmu, list(reversed(mmu.active_mmu_pages)), None)
    arrays._done()
    slot, singles = arrays._slots[0], sorted(arrays._singles[0])
    assert singles and slot.rmap.entry_count(singles) == slot.rmap.entry_count()
    covered = {g for a, b in singles for g in range(a, b)}
    gfn = next(g for g in range(slot.base_gfn, slot.end_gfn) if g not in covered)
    sptep = int(arrays.index[arrays._order[0]]) << 9  # a leaf of a stretch, of another gfn
    slot.rmap.add(gfn, sptep)
    assert any("which does not map it" in m for m in _full_runs_agree(vm))


def test_the_passs_parts_end_where_its_pieces_do(monkeypatch):
    """The seven parts of the pass (a store point before each) end where a piece of a stretch
    or a block ends, each near its seventh of the pages: no piece is checked in two."""
    vm = touched_vm(256)
    pages = list(reversed(vm.mmu.active_mmu_pages))
    arrays = audit_vector.PageArrays(vm.mmu, pages, None)
    checked = arrays._stretch_clean
    sizes: list[int] = []
    monkeypatch.setattr(arrays, "_stretch_clean", lambda rows: sizes.append(len(rows)) or checked(rows))
    ends = []
    for _, work in arrays.stages():
        work()
        ends.append(arrays._filled)
    pieces = np.diff([0, *arrays._cuts]).tolist()
    assert sizes == pieces[: len(sizes)] and sum(sizes) == arrays._stretched > 0
    assert set(ends) <= {0, *arrays._cuts} and ends[-1] == len(pages)
    assert all(abs(end - len(pages) * k // audit_vector.STAGES) <= audit_vector.BLOCK_ROWS
               for k, end in enumerate(ends, 1))


def test_each_thread_checks_stretches_in_temporaries_of_its_own():
    """The temporaries of a stretch's check are made once per thread, not per run: numpy lets
    another thread (auditing another VM) run during an operation."""
    mine = audit_vector._scratch()
    theirs: list[np.ndarray] = []
    thread = threading.Thread(target=lambda: theirs.append(audit_vector._scratch()))
    thread.start()
    thread.join()
    assert audit_vector._scratch() is mine
    assert not np.shares_memory(theirs[0], mine)


def test_a_leaf_among_upper_level_pages_is_checked():
    """The pass takes the upper-level pages last, in blocks of their own, and a block with no
    leaf (no present spte with PS: mmud installs none) is done once it has counted them; a
    2 MiB spte made there by damage is checked as entry by entry checks it."""
    vm = touched_vm(64)
    mmu = vm.mmu
    assert _full_runs_agree(vm) == []
    sp = next(sp for sp in reversed(mmu.active_mmu_pages) if sp.level == 2 and sp.sptes.any())
    i = int(np.flatnonzero(sp.sptes & np.uint64(S.SPTE_MMU_PRESENT))[0])
    sp.spt[i] |= S.PT_PAGE_SIZE_MASK
    found = _full_runs_agree(vm)
    assert any("is not in its rmap" in m for m in found)
    assert any("breaks W => MMU-writable => Host-writable" in m for m in found)


LINK_DAMAGE = ("unlisted", "bogus", "twice", "stale", "count", "unsync", "repointed")


def _damage_links(mmu, rng, damage: str) -> None:
    """Parent links no bug breaks this way: an entry dropped, added, or listed twice or from
    a free page in place of another, a wrong unsync_children, an unsync page below a clear
    bit, an spte pointing elsewhere."""
    pages = list(mmu.active_mmu_pages)
    listed = [sp for sp in pages if len(sp.parent_ptes)]
    sp = listed[int(rng.integers(len(listed)))]
    sptep = next(iter(sp.parent_ptes))
    if damage == "unlisted":
        sp.parent_ptes.remove(sptep)
    elif damage == "bogus":
        sp.parent_ptes.append(sptep ^ 1)
    elif damage == "twice":  # and another dropped: as many entries as links
        sp.parent_ptes.append(sptep)
        other = next(o for o in listed if o is not sp)
        other.parent_ptes.remove(next(iter(other.parent_ptes)))
    elif damage == "stale":  # a free page's stale link in place of a live one
        free = mmu.pool.free_rows()[0]
        mmu.pool.pages[free].spt[0] = S.make_nonleaf_spte(sp.index)
        sp.parent_ptes.append(free << 9)
        other = next(o for o in listed if o is not sp)
        other.parent_ptes.remove(next(iter(other.parent_ptes)))
    elif damage == "count":
        sp.unsync_children += 1
    elif damage == "unsync":
        sp.unsync = True
    else:
        parent = mmu.pool.pages[sptep >> 9]
        other = listed[int(rng.integers(len(listed)))]
        parent.spt[sptep & 511] = S.make_nonleaf_spte(other.index)


@pytest.mark.parametrize("damage", LINK_DAMAGE)
def test_links_checked_as_a_whole_report_what_page_by_page_does(damage):
    vm = touched_vm(256)
    mmu = vm.mmu
    rng = np.random.default_rng(LINK_DAMAGE.index(damage))
    pages = list(reversed(mmu.active_mmu_pages))
    assert len(pages) >= 64  # enough for the check of the whole

    def page_by_page() -> list[str]:
        return [m for sp in pages for m in C._parent_links(mmu, sp, False)]

    assert C.check_parent_links(mmu, pages) == page_by_page() == []
    _damage_links(mmu, rng, damage)
    assert C.check_parent_links(mmu, pages) == page_by_page() != []
