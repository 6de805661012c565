"""Zapping shadow pages: one page, the oldest pages for the budget, and all of them.

`prepare_zap_page` + `commit_zap_page` follow __kvm_mmu_prepare_zap_page and
kvm_mmu_commit_zap_page: a zapped sp loses its children links, its parent sptes and its
write protection; if a vCPU still uses it as a root it stays on the active list, marked
invalid, until the last root reference is dropped (v5.4–v5.12; from v5.13 such a root leaves
the list at once).

The three zaps of every shadow page (ZAP_KINDS: fast, slow, legacy) and the lock breaks they
take are described in docs/memslots-mmio.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from itertools import chain, islice
from typing import TYPE_CHECKING

import numpy as np

from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.mmu import (
    KVM_MIN_FREE_MMU_PAGES,
    KVM_REFILL_PAGES,
    KvmMmu,
)
from mmud.kvm.mmu.page import SPTEP_SHIFT, ShadowPage, spte_index, sptep_page
from mmud.x86.paging import PAGE_SHIFT, PT64_ENT_PER_PAGE, PT_PAGE_SIZE_MASK

if TYPE_CHECKING:
    from mmud.kvm.mmu.vcpu_mmu import VcpuMmu

BATCH_ZAP_PAGES = 10
_MMU_PRESENT = np.uint64(S.SPTE_MMU_PRESENT)
_TABLE_BITS = S.SPTE_MMU_PRESENT | PT_PAGE_SIZE_MASK  # of these, a table entry has the first
_PRESENT_OR_LARGE = np.uint64(_TABLE_BITS)


def mmu_page_zap_pte(mmu: KvmMmu, sp: ShadowPage, i: int) -> bool:
    """Clear entry i of sp: unlink a child or drop a leaf. True if it was present."""
    spte = sp.spt[i]
    if spte & S.SPTE_MMU_PRESENT:
        if S.is_last_spte(spte, sp.level):
            mmu.drop_spte(sp, i)
        else:
            mmu.drop_parent_pte(mmu.child_of(spte), sp, i)
        return True
    if S.is_mmio_spte(spte):
        if mmu.obs: mmu.obs.zap_mmio_spte(sp, i)  # observer
        sp.spt[i] = 0
    return False


# Fewer entries than this (present ones in a leaf page) go through mmu_page_zap_pte() one by
# one even when nobody observes: a page-at-once zap is a fixed few dozen numpy operations,
# and a root or a directory of a few children is cheaper entry by entry.
ZAP_AT_ONCE_ENTRIES = 16


def _unlink_children(mmu: KvmMmu, sp: ShadowPage) -> None:
    sptes = sp.sptes
    if mmu.obs is None and mmu.bug is None:
        if sp.level == 1:
            present = sptes & _MMU_PRESENT
            n_present = int(np.count_nonzero(present))
            if n_present >= ZAP_AT_ONCE_ENTRIES:
                _drop_leaf_sptes(mmu, sp, present, n_present)
                return
        else:
            n = int(np.count_nonzero(sptes))
            if n >= ZAP_AT_ONCE_ENTRIES and _unlink_child_pages(mmu, sp, n):
                return
    spt = sp.spt
    for i in sptes.nonzero()[0].tolist():
        if spt[i]:
            mmu_page_zap_pte(mmu, sp, i)


# Entry k of a directory whose children are consecutive pool rows from its entry 0's on,
# each entry with the same bits (the usual directory of a direct map: its children were made
# in order), holds entry 0 plus this.
_CHILD_RUN = np.arange(PT64_ENT_PER_PAGE, dtype=np.uint64) << np.uint64(PAGE_SHIFT)


def _unlink_child_pages(mmu: KvmMmu, sp: ShadowPage, n: int) -> bool:
    """mmu_page_zap_pte() of every entry (`n` are nonzero) of an upper-level page, at once,
    when none is a leaf (mmud has no huge sptes): each child loses its parent pte
    (drop_parent_pte) and the page ends empty. A 2 MiB-per-page guest's directory has up to
    512 children: their parent_ptes heads are cleared together in the pool's parent rmap —
    as one slice (Rmap.remove_run) when entry k's child is entry 0's plus k. False, having
    done nothing, if a leaf is there."""
    sptes = sp.sptes
    parents = mmu.pool.parent_ptes
    first = int(sptes[0])
    if first & _TABLE_BITS == S.SPTE_MMU_PRESENT and np.count_nonzero(sptes == _CHILD_RUN + first) == n:
        child = S.spte_child_index(first)
        if child + PT64_ENT_PER_PAGE <= len(parents.head):
            parents.remove_run(child, sptes, n, sp.index << SPTEP_SHIFT)
            sptes.fill(0)
            return True
    idx = sptes.nonzero()[0]
    values = sptes[idx]
    kinds = values & _PRESENT_OR_LARGE
    if np.count_nonzero(kinds != _MMU_PRESENT):  # an MMIO spte (cleared), or a leaf
        if np.count_nonzero(kinds == _PRESENT_OR_LARGE):
            return False
        present = kinds == _MMU_PRESENT
        values, idx = values[present], idx[present]
    sptes.fill(0)
    children = S.spte_child_indices(values)
    parents.remove_many(children, idx | (sp.index << SPTEP_SHIFT))
    return True


def _drop_leaf_sptes(mmu: KvmMmu, sp: ShadowPage, present: np.ndarray, n_present: int) -> None:
    """mmu_page_zap_pte() of every entry of a last-level page, at once: each present spte
    leaves its gfn's rmap (pages_4k counts those that were there), MMIO sptes are cleared,
    and the page ends empty — what the loop leaves, when no observer needs to see each
    spte go and no injected bug changes drop_spte(). `present`: the sptes' MMU-present
    bits, `n_present` how many are set. A direct page's gfns are consecutive: one slice of
    rmap heads, when one slot holds them all."""
    sptes = sp.sptes
    first_sptep = sp.index << SPTEP_SHIFT
    if sp.direct:
        slot = mmu.memslots.lookup(sp.gfn)
        if slot is not None and sp.gfn + PT64_ENT_PER_PAGE <= slot.end_gfn:  # the usual case
            mmu.stat["pages_4k"] -= slot.rmap.remove_run(sp.gfn, present, n_present, first_sptep)
            sptes.fill(0)
            return
    entries = np.flatnonzero(present)
    sptes.fill(0)
    spteps = entries | first_sptep
    if sp.direct:
        gfns = entries + sp.gfn
    else:
        gfns = np.asarray(sp.gfns)[entries].astype(np.int64)
    removed = 0
    while len(gfns):
        lo, hi = int(gfns.min()), int(gfns.max())
        slot = mmu.memslots.lookup(lo)
        if slot is not None and hi < slot.base_gfn + slot.npages:
            removed += slot.rmap.remove_many(gfns, spteps)
            break
        end = lo + 1 if slot is None else slot.base_gfn + slot.npages
        mine = (gfns >= lo) & (gfns < end)
        if slot is not None:
            removed += slot.rmap.remove_many(gfns[mine], spteps[mine])
        gfns, spteps = gfns[~mine], spteps[~mine]
    mmu.stat["pages_4k"] -= removed


def _unlink_parents(mmu: KvmMmu, sp: ShadowPage) -> None:
    parent_ptes = mmu.pool.parent_ptes.get(sp.index)  # sp.parent_ptes, without its wrapper
    if not parent_ptes:  # a leaf whose directory went first
        return
    pages = mmu.pool.pages
    for sptep in list(parent_ptes):
        mmu.drop_parent_pte(sp, pages[sptep_page(sptep)], spte_index(sptep))


def prepare_zap_page(mmu: KvmMmu, sp: ShadowPage, invalid_list: list[ShadowPage]) -> int:
    """__kvm_mmu_prepare_zap_page(); returns how many pages it moved to invalid_list."""
    if mmu.obs: mmu.obs.prepare_zap_page(sp)  # observer
    mmu.stat["mmu_shadow_zapped"] += 1
    nr_zapped = 0
    if sp.level > 1:
        for child in mmu.mmu_unsync_walk(sp):
            if child in mmu.active_mmu_pages and not child.invalid:
                nr_zapped += prepare_zap_page(mmu, child, invalid_list)
    _unlink_children(mmu, sp)
    _unlink_parents(mmu, sp)
    if not sp.invalid and not sp.direct:
        mmu.unaccount_shadowed(sp)
    if sp.unsync:
        mmu.kvm_unlink_unsync_page(sp)
    if not sp.root_count:
        nr_zapped += 1
        del mmu.active_mmu_pages[sp]
        invalid_list.append(sp)
        mmu.n_used_mmu_pages -= 1
    else:
        # Still a root somewhere: move to the head, and ask the vCPUs to let go of it.
        del mmu.active_mmu_pages[sp]
        mmu.active_mmu_pages[sp] = None
        if not mmu.is_obsolete_sp(sp):
            mmu.kvm_reload_remote_mmus()
    sp.mark_invalid()
    return nr_zapped


def commit_zap_page(mmu: KvmMmu, *invalid_lists: list[ShadowPage]) -> None:
    """kvm_mmu_commit_zap_page(): one remote flush, then free every page of the list — of
    the lists, in order: a zap of every page fills one per INVALID_LIST_CHUNK pages.

    The pool takes the lists themselves (free_pages), not copies, and the caller's list is
    not emptied as the kernel's list_del of each page empties it: every caller's list is its
    own, dropped after the commit. Copying and clearing a 64 GiB guest's 32,800 pages took
    up to 1.7 ms, the longest hold of its fast zap."""
    if not any(invalid_lists):
        return
    mmu.kvm_flush_remote_tlbs()
    if mmu.obs: mmu.obs.kvm_mmu_commit_zap_page(list(chain.from_iterable(invalid_lists)))  # observer
    for invalid_list in invalid_lists:
        mmu.free_pages(invalid_list)


# Pages a zap of every page puts on one invalid list before it starts the next: a list that
# grows by appends is moved whole now and then, and one of a 64 GiB guest's 32,800 pages
# (256 KiB of pointers, into memory the host had not committed yet) took 0.45 ms in one step.
INVALID_LIST_CHUNK = 512


def _invalid_list(invalid_lists: list[list[ShadowPage]]) -> list[ShadowPage]:
    """The list a zap of every page puts its next page on (INVALID_LIST_CHUNK)."""
    if len(invalid_lists[-1]) >= INVALID_LIST_CHUNK:
        invalid_lists.append([])
    return invalid_lists[-1]


def kvm_mmu_flush_or_zap(
    mmu: KvmMmu, vmmu: VcpuMmu, invalid_list: list[ShadowPage], remote_flush: bool, local_flush: bool
) -> None:
    if invalid_list:
        commit_zap_page(mmu, invalid_list)
        return
    if remote_flush:
        mmu.kvm_flush_remote_tlbs()
        return
    if local_flush:
        vmmu.vcpu.request_tlb_flush()


def prepare_zap_oldest_mmu_page(mmu: KvmMmu, invalid_list: list[ShadowPage]) -> bool:
    """v5.6: zap the tail of active_mmu_pages; False if there is none to zap."""
    if not mmu.active_mmu_pages:
        return False
    sp = next(iter(mmu.active_mmu_pages))
    return prepare_zap_page(mmu, sp, invalid_list) > 0


def make_mmu_pages_available(mmu: KvmMmu) -> bool:
    """Keep KVM_MIN_FREE_MMU_PAGES free, recycling the oldest pages; False = -ENOSPC."""
    if mmu.kvm_mmu_available_pages() >= KVM_MIN_FREE_MMU_PAGES:
        return True
    invalid_list: list[ShadowPage] = []
    while mmu.kvm_mmu_available_pages() < KVM_REFILL_PAGES:
        if not prepare_zap_oldest_mmu_page(mmu, invalid_list):
            break
        mmu.stat["mmu_recycled"] += 1
    commit_zap_page(mmu, invalid_list)
    return mmu.kvm_mmu_available_pages() > 0


def kvm_mmu_change_mmu_pages(mmu: KvmMmu, goal: int) -> None:
    """Set the page budget; zap oldest pages until the pool fits (not counted as recycled)."""
    if mmu.n_used_mmu_pages > goal:
        invalid_list: list[ShadowPage] = []
        while mmu.n_used_mmu_pages > goal:
            if not prepare_zap_oldest_mmu_page(mmu, invalid_list):
                break
        commit_zap_page(mmu, invalid_list)
        goal = mmu.n_used_mmu_pages
    mmu.n_max_mmu_pages = goal


def kvm_mmu_set_nr_mmu_pages(mmu: KvmMmu, nr: int) -> None:
    """KVM_SET_NR_MMU_PAGES (the caller has refused nr < KVM_MIN_ALLOC_MMU_PAGES)."""
    mmu.n_requested_mmu_pages = nr
    kvm_mmu_change_mmu_pages(mmu, nr)


def kvm_mmu_unprotect_page(mmu: KvmMmu, gfn: int) -> bool:
    """Zap every indirect sp of gfn so the guest may write the page freely again."""
    invalid_list: list[ShadowPage] = []
    found = False
    for sp in mmu.indirect_valid_sps_of_gfn(gfn):
        found = True
        prepare_zap_page(mmu, sp, invalid_list)
    commit_zap_page(mmu, invalid_list)
    return found


# --- zapping every shadow page ---------------------------------------------------------------

# The three whole-VM zaps, by the kernel each comes from (docs/memslots-mmio.md):
# fast   kvm_mmu_zap_all_fast + kvm_zap_obsolete_pages: the 2013 series, as in v5.16;
# slow   kvm_mmu_zap_all as since v5.1: a lock break after any page when needed;
# legacy kvm_mmu_zap_all before 2013 (≤v3.10): the lock held from the first page to the last.
ZAP_KINDS = ("fast", "slow", "legacy")
_TASK_NAMES = {"fast": "kvm_zap_obsolete_pages", "slow": "kvm_mmu_zap_all",
               "legacy": "kvm_mmu_zap_all_legacy"}

# need_resched(), the other half of __cond_resched_lock(): the scheduler tick sets it once the
# running task has used up its time slice while another task waits for the CPU. mmud's tick:
# the zap's task has run NEED_RESCHED_STEPS scheduler steps of its own since it last gave up
# the CPU (its start, or a lock break taken for need_resched), and the scheduler has another
# task. 200 steps are 4 ms at mmud.machine.STEP_NS (20 µs): one tick at HZ=250. The count
# depends only on the seeded interleaving, so runs stay deterministic; a zap driven to its
# end outside the scheduler (`finish`) has no other task and never sees it.
NEED_RESCHED_STEPS = 200


class ZapRun:
    """One zap of every shadow page, and kvm->mmu_lock as it saw it.

    The walk is a generator. It takes the lock at its first step and holds it to its end,
    except in its lock breaks; each step in between is one shadow page's work. Between two
    steps other tasks run — the vCPUs on their own CPUs — and one that needs the lock finds
    it held (`KvmMmu.mmu_lock_held`): it queues on it (`waiter_arrives`, from
    Kvm.wait_mmu_lock) and spins while the zap's CPU goes on (`run_to_break`). The zap sees
    the waiter as spin_needbreak() at its next cond_resched_lock() and, where the kernel
    calls it, drops the lock; the waiter takes it, and the zap takes it back at its next
    step. `task()` runs the zap as a scheduler task; `finish()` runs it to its end here.

    The figures are the simulating thread's CPU time in the zap's own steps, so that neither
    the vCPU steps interleaved with it nor other processes on the host count:
    `cpu_ns` from start to end, `hold_ns` with the lock held, `max_hold_ns` the longest hold,
    and `max_stall_ns` the longest time a task queued on the lock waited for it.
    """

    def __init__(self, kind: str, mmu: KvmMmu, walk: Callable[[ZapRun], Iterator[None]]) -> None:
        self.kind = kind
        self.task_name = _TASK_NAMES[kind]
        self.mmu = mmu
        self.pages = 0  # pages freed (the walk's nr_zapped, summed)
        self.breaks = 0  # lock breaks: cond_resched_lock() returned 1
        self.restarts = 0  # walks restarted from the list's end (`goto restart`)
        self.batches: list[int] = []  # pages freed in each lock hold, in order
        self.handoffs = 0  # waiters that took the lock in a break
        self.cpu_ns = 0
        self.hold_ns = 0
        self.max_hold_ns = 0
        self.max_stall_ns = 0
        self.done = False
        self.lock_held = False
        self._batch = 0  # pages freed in this hold
        self._this_hold_ns = 0
        self._hold_ended = False
        self._holder_before = False  # mmu_lock_held when taken (only finish() takes it so)
        self._waiters: dict[int, int] = {}  # queued tasks: token -> hold_ns when they came
        self._tokens = 0
        self._slice_steps = 0  # own steps since the zap's task last gave up its CPU
        self._others_runnable: Callable[[], bool] = lambda: False
        self._finishing = False
        self._walk = walk(self)

    # --- the lock -----------------------------------------------------------------------

    def lock(self) -> Iterator[None]:
        """spin_lock(&kvm->mmu_lock): spin, a step at a time, while another task (a dirty-log
        harvest) holds it. `finish()` cannot wait for a task: it takes the lock as it is."""
        while self.mmu.mmu_lock_held and not self._finishing:
            yield
        self._holder_before = self.mmu.mmu_lock_held
        self.mmu.mmu_lock_held = True
        self.lock_held = True

    def unlock(self) -> None:
        self.mmu.mmu_lock_held = self._holder_before
        self.lock_held = False
        self._hold_ended = True
        self.batches.append(self._batch)
        self._batch = 0

    def need_resched(self) -> bool:
        """The tick's verdict (NEED_RESCHED_STEPS): the zap has had the CPU for a slice."""
        return (not self._finishing and self._slice_steps >= NEED_RESCHED_STEPS
                and self._others_runnable())

    def cond_resched_lock(self) -> Generator[None, None, bool]:
        """__cond_resched_lock(&kvm->mmu_lock): if a task waits for the lock (spin_needbreak)
        or the zap is due to give up its CPU (need_resched), drop the lock, let the others
        run, take it again; True if it did. (v5.16 calls cond_resched_rwlock_write: mmu_lock
        is an rwlock since v5.12, with the same rule. spin_needbreak() is the contention
        only in a CONFIG_PREEMPTION kernel, which mmud models; without it only need_resched
        breaks.)"""
        resched = self.need_resched()
        if not (self._waiters or resched):
            return False
        self.breaks += 1
        self.unlock()
        if resched:
            self._slice_steps = 0  # preempt_schedule_common(): the task leaves its CPU
        yield  # the lock is free: the waiters take it, the vCPUs run
        yield from self.lock()
        return True

    def page_work(self) -> Iterator[None]:
        """The step boundary before a page is zapped: the page's work is the next step, the
        lock held, while the other CPUs run. A task that comes for the lock here waits for
        at least this page — as one that comes at any moment of a page's work does."""
        yield

    def zapped(self, nr_zapped: int) -> None:
        self.pages += nr_zapped
        self._batch += nr_zapped

    # --- the tasks queued on the lock ---------------------------------------------------

    def waiter_arrives(self) -> int:
        """A task queues on the lock while the zap holds it; a token for waiter_leaves."""
        self._tokens += 1
        self._waiters[self._tokens] = self.hold_ns
        return self._tokens

    def waiter_leaves(self, token: int) -> None:
        """The task got the lock (or gave up): its stall is the zap's hold time meanwhile."""
        came = self._waiters.pop(token)
        self.max_stall_ns = max(self.max_stall_ns, self.hold_ns - came)
        self.handoffs += not self.done and not self.lock_held

    def run_to_break(self) -> None:
        """A queued task spins: the zap's CPU goes on to its next lock break or its end."""
        while self.lock_held and self._step():
            pass

    # --- driving the walk ----------------------------------------------------------------

    def _step(self) -> bool:
        """One step of the walk; False once the zap is complete."""
        if self.done:
            return False
        held = self.lock_held
        self._hold_ended = False
        self._slice_steps += 1
        t0 = time.thread_time_ns()
        try:
            next(self._walk)
        except StopIteration:
            self.done = True
        dt = time.thread_time_ns() - t0
        self.cpu_ns += dt
        if held or self.lock_held or self._hold_ended:
            self.hold_ns += dt
            self._this_hold_ns += dt
        if self._hold_ended:
            self.max_hold_ns = max(self.max_hold_ns, self._this_hold_ns)
            self._this_hold_ns = 0
        return not self.done

    def finish(self) -> None:
        """Run to the end here: nothing else runs, so nobody queues and need_resched never
        comes (a break is still taken for a task already queued)."""
        self._finishing = True
        while self._step():
            pass

    def task(self, others_runnable: Callable[[], bool] = lambda: True) -> Iterator[None]:
        """The zap as a scheduler task, one step of the walk per scheduler step;
        `others_runnable` tells need_resched whether another task wants the CPU."""
        self._others_runnable = others_runnable
        return self._task()

    def _task(self) -> Iterator[None]:
        while self._step():
            yield


def _prepare_zap(mmu: KvmMmu, sp: ShadowPage, invalid_list: list[ShadowPage]) -> tuple[bool, int]:
    """__kvm_mmu_prepare_zap_page() with its two answers: list_unstable (unsync children were
    zapped with sp) and nr_zapped (those children, and sp unless it is still a root)."""
    pinned = sp.root_count > 0
    nr_zapped = prepare_zap_page(mmu, sp, invalid_list)
    return nr_zapped > (0 if pinned else 1), nr_zapped


def _zap_all_walk(mmu: KvmMmu, run: ZapRun, legacy: bool) -> Iterator[None]:
    """kvm_mmu_zap_all(): every page, newest first, the walk restarting from the head.

    Since v5.1 (`legacy` False) it restarts after a page whose zap took unsync children
    along, and after a lock break (cond_resched_lock, tried after every page) — pages built
    in the break are zapped too. Invalid pages still pinned as roots are skipped: they go
    when their vCPUs drop them (v5.4–v5.12; from v5.13 a zapped root leaves the list and the
    test is WARN_ON(invalid)).

    Before the 2013 series (`legacy`, ≤v3.10) there was no lock break at all:

        restart:
            list_for_each_entry_safe(sp, node, &kvm->arch.active_mmu_pages, link)
                if (kvm_mmu_prepare_zap_page(kvm, sp, &invalid_list))
                    goto restart;

    kvm_mmu_prepare_zap_page() then returned the pages it zapped, sp included, so the walk
    restarted after every page freed; nothing skipped an invalid root, so a root still
    pinned (moved to the head) was prepared again at each restart, and counted in
    mmu_shadow_zapped each time.
    """
    yield from run.lock()
    invalid_lists: list[list[ShadowPage]] = [[]]
    active = mmu.active_mmu_pages
    restart = True
    while restart:
        restart = False
        for sp in reversed(list(active)):  # list_for_each_entry_safe: from the head
            if sp not in active or (not legacy and sp.invalid and sp.root_count):
                continue
            yield from run.page_work()  # legacy: the lock held all along, a waiter waits
            if sp not in active:  # taken meanwhile by a host call that does not lock
                continue
            unstable, nr_zapped = _prepare_zap(mmu, sp, _invalid_list(invalid_lists))
            run.zapped(nr_zapped)
            if legacy:
                restart = nr_zapped > 0
            else:
                restart = unstable or (yield from run.cond_resched_lock())
            if restart:
                break
        run.restarts += restart
    commit_zap_page(mmu, *invalid_lists)
    run.unlock()


def kvm_mmu_zap_all(mmu: KvmMmu) -> ZapRun:
    """The slow whole-VM zap (v5.1+): page by page, breaking the lock when contended."""
    return ZapRun("slow", mmu, lambda run: _zap_all_walk(mmu, run, legacy=False))


def kvm_mmu_zap_all_legacy(mmu: KvmMmu) -> ZapRun:
    """The whole-VM zap before 2013: page by page with the lock held throughout."""
    return ZapRun("legacy", mmu, lambda run: _zap_all_walk(mmu, run, legacy=True))


WALK_CHUNK = 16  # pages _from_tail reads from the list at a time


def _from_tail(active: dict[ShadowPage, None]) -> Iterator[ShadowPage]:
    """The pages of active_mmu_pages from the tail, as the walk that zaps them finds them:
    a page leaves the list (zapped) or moves to its head (a root) before the next is read.

    A few at a time, from the live list: a copy of a 64 GiB guest's whole list at every
    restart would be the longest step of the zap. Pages passed over stay at the tail (the
    walk skips pinned invalid roots), so each read starts past them."""
    passed: dict[ShadowPage, None] = {}
    while True:
        passed = {sp: None for sp in passed if sp in active}
        chunk = [sp for sp in islice(active, len(passed) + WALK_CHUNK) if sp not in passed]
        if not chunk:
            return
        for sp in chunk:
            if sp in active and sp not in passed:
                passed[sp] = None
                yield sp


def kvm_zap_obsolete_pages(mmu: KvmMmu, run: ZapRun) -> Iterator[None]:
    """Zap the obsolete pages oldest first (v5.16), with a lock break where one is due.

    The walk starts at the tail and stops at the first valid page: active_mmu_pages is a
    FIFO, so everything newer than a valid page is valid too (pages the vCPUs build during
    a lock break are new). Invalid pages pinned as roots are skipped (v5.4–v5.12; from
    v5.13 they are off the list); they are freed when their vCPUs drop them. Before each
    page, `if (batch >= BATCH_ZAP_PAGES && cond_resched_lock(&kvm->mmu_lock))`: once ten
    pages are zapped, a break if a task waits for the lock or a reschedule is due, and
    the walk restarts from the tail; with neither, no break at all. A page whose zap took
    unsync children along restarts the walk too. No TLB flush per page: every vCPU has been
    asked to load a new root, and the zapped pages are committed, with one remote flush, at
    the end.

    `batch` counts every page zapped, as since the 2022 fix "KVM: x86/mmu: Update number
    of zapped pages even if page list is stable" (Cc: stable). v5.16 itself added to batch
    only when unsync children went along, so a guest without unsync pages never reached
    ten and the zap never yielded — the soft lockup that fix is about.
    """
    yield from run.lock()
    invalid_lists: list[list[ShadowPage]] = [[]]
    active = mmu.active_mmu_pages
    batch = 0
    restart = True
    while restart:
        restart = False
        for sp in _from_tail(active):  # list_for_each_entry_safe_reverse
            if not mmu.is_obsolete_sp(sp):
                break
            if sp.invalid and sp.root_count:
                continue
            if batch >= BATCH_ZAP_PAGES and (yield from run.cond_resched_lock()):
                batch = 0
                restart = True
                break
            yield from run.page_work()
            if sp not in active:  # taken meanwhile by a host call that does not lock
                continue
            unstable, nr_zapped = _prepare_zap(mmu, sp, _invalid_list(invalid_lists))
            batch += nr_zapped
            run.zapped(nr_zapped)
            if unstable:
                restart = True
                break
        run.restarts += restart
    commit_zap_page(mmu, *invalid_lists)
    run.unlock()


def kvm_mmu_zap_all_fast(mmu: KvmMmu) -> ZapRun:
    """Invalidate every shadow page at once by toggling mmu_valid_gen (the 2013 series; v5.16).

    The toggle and the reload request happen now, under the lock, so no vCPU can miss
    them: lookups skip obsolete pages from here on, and every vCPU drops its roots at its
    next entry. The returned run frees the obsolete pages; drive it to the end (`finish`)
    or let vCPUs run in its lock breaks (`task`). The caller serialises zaps (slots_lock):
    with a 0/1 generation there must never be two obsolete generations at once.
    """
    if mmu.obs: mmu.obs.kvm_mmu_zap_all_fast(mmu.mmu_valid_gen, mmu.n_used_mmu_pages)  # observer
    mmu.mmu_valid_gen ^= 1
    mmu.kvm_reload_remote_mmus()
    return ZapRun("fast", mmu, lambda run: kvm_zap_obsolete_pages(mmu, run))
