"""The run-time MMU audit (CONFIG_KVM_MMU_AUDIT, mmu_audit.c ≤v5.17), switchable and rate limited.

Audit points sit where the kernel had them (`pre/post page fault`, `pre/post pte write`,
`pre/post sync`); each is one line `if mmu.audit_enabled: kvm_mmu_audit(...)  # audit point`,
so with the audit off a point costs one attribute test (the static key's job in the kernel).

One run, as in the kernel: a module-wide rate limiter (10 runs per 5 s, shared by all VMs of
the module) may skip it; otherwise every active page gets checks 5 and 6, then the vCPU's
shadow tree from its root gets checks 3, 1 and 4 — plus mmud's extended checks.

`mmu_audit_scope=incremental` answers the objection raised against a rate-limited audit (it
sees a bug long after it happened): the MMU records which shadow pages and gfns it touched
since the last run (`AuditTrack`), and a run checks only those, their rmaps, parents and
children. That is cheap enough to run at every point, and catches a bug at the post point of
the very operation that ran it. Pre points do nothing in this scope: each opens the operation
its post point checks. What is touched outside audited operations (INVLPG, zap-all, root
loads) is checked at the next run, so nothing escapes.

Time is the VM's simulated clock (`Kvm.clock_ns`), so the rate limiter, like the rest of
the simulation, gives the same run for the same seed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import structlog

from mmud.kvm.memslot import Memslot, bitmap_pages
from mmud.kvm.mmu import audit_checks as C
from mmud.kvm.ratelimit import Ratelimit
from mmud.kvm.mmu.audit_scalar import PageEntries
from mmud.kvm.mmu.audit_vector import PageArrays
from mmud.kvm.mmu.mmu import KvmMmu
from mmud.kvm.mmu.observer import MmuObserver
from mmud.kvm.mmu.page import ShadowPage, sptep_page
from mmud.x86.paging import PT64_ROOT_4LEVEL

if TYPE_CHECKING:
    from mmud.kvm.mmu.vcpu_mmu import VcpuMmu

AUDIT_PRE_PAGE_FAULT = "pre page fault"
AUDIT_POST_PAGE_FAULT = "post page fault"
AUDIT_PRE_PTE_WRITE = "pre pte write"
AUDIT_POST_PTE_WRITE = "post pte write"
AUDIT_PRE_SYNC = "pre sync"
AUDIT_POST_SYNC = "post sync"
_PRE_POINTS = frozenset((AUDIT_PRE_PAGE_FAULT, AUDIT_PRE_PTE_WRITE, AUDIT_PRE_SYNC))
AUDIT_LOG_LINES = 4096  # kvm/audit_log keeps the newest lines
RMAP_REPORT_INTERVAL_MS = 5000  # inspect_spte_has_rmap's own limiter, fixed in the kernel
RMAP_REPORT_BURST = 10
# The structlog copy of the error lines is printk_ratelimited() style (DEFAULT_RATELIMIT_*):
# at most 10 `mmu_audit_error` events per 5 s of simulated time per module; kvm/audit_log
# keeps every line.
ERROR_LOG_INTERVAL_MS = 5000
ERROR_LOG_BURST = 10

log = structlog.get_logger("mmud.audit")


@dataclass
class ModuleAudit:
    """State the kernel keeps once per module: the run limiter and the audit log; and the
    limiter of the error lines' structlog copy (stdout/journald), which the log does not
    have: an armed bug would otherwise print thousands of events a second."""

    run_limit: Ratelimit
    rmap_limit: Ratelimit = field(
        default_factory=lambda: Ratelimit("inspect_spte_has_rmap", RMAP_REPORT_INTERVAL_MS, RMAP_REPORT_BURST)
    )
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=AUDIT_LOG_LINES))
    error_log_limit: Ratelimit = field(
        default_factory=lambda: Ratelimit("mmu_audit_error", ERROR_LOG_INTERVAL_MS, ERROR_LOG_BURST)
    )
    # The places inside a step where a parameter store may land (`store_point`): how many
    # have passed, module-wide — with the step counts, a recording's position of such a
    # store — and who looks for a pending store there (the daemon's simulation; None: nobody).
    points: int = 0
    where: str = ""  # the last one: an audit point, or "<point> before <check>" inside a run
    notice: Callable[[], None] | None = None


def store_point(mmu: KvmMmu, where: str) -> bool:
    """A place where a pending store to the audit's parameters lands: at each audit point
    and between the checks of a run, so that no store waits for a whole run (a full run
    over gigabytes of guest takes tens of milliseconds). Whether the audit is still on."""
    state = mmu.module_audit
    state.points += 1
    state.where = where
    if state.notice is not None:
        state.notice()
    return mmu.audit_enabled


class AuditTrack(MmuObserver):
    """What the MMU touched since the last incremental run: an observer of the MMU.

    `sps`: pages changed as a whole (allocated, synced, zapped); `entries`: pages of which
    only some entries changed (an spte installed or dropped, a child linked) — an empty set
    when only the page's links or unsync state changed; `gfns`: gfns whose rmap, write
    protection or guest table changed.
    """

    __slots__ = ("sps", "entries", "gfns")

    def __init__(self) -> None:
        self.sps: set[ShadowPage] = set()
        self.entries: dict[ShadowPage, set[int]] = {}
        self.gfns: set[int] = set()

    def clear(self) -> None:
        """A run has checked everything noted so far."""
        self.sps, self.entries, self.gfns = set(), {}, set()

    def note(self, sp: ShadowPage | None, gfn: int | None = None, i: int | None = None) -> None:
        if sp is not None:
            if i is None:
                self.sps.add(sp)
            else:
                self.entries.setdefault(sp, set()).add(i)
        if gfn is not None:
            self.gfns.add(gfn)

    def note_links(self, sp: ShadowPage) -> None:
        self.entries.setdefault(sp, set())

    # --- MmuObserver events ----------------------------------------------------------------

    def _whole_page(self, sp: ShadowPage) -> None:
        self.note(sp, sp.gfn)

    alloc_page = prepare_zap_page = account_shadowed = unaccount_shadowed = _whole_page
    kvm_unsync_page = kvm_unlink_unsync_page = sync_page = _whole_page

    def _link(self, parent: ShadowPage, i: int, child: ShadowPage) -> None:
        self.note_links(child)
        self.note(parent, None, i)

    link_shadow_page = drop_parent_pte = _link

    def unsync_children_changed(self, sp: ShadowPage) -> None:
        self.note_links(sp)

    def set_spte(self, sp: ShadowPage, i: int, gfn: int) -> None:
        self.note(sp, gfn, i)

    def drop_spte(self, sp: ShadowPage, i: int) -> None:
        self.note(sp, sp.gfn_of(i), i)

    def zap_mmio_spte(self, sp: ShadowPage, i: int) -> None:
        self.note(sp, None, i)

    def rmap_remove(self, sp: ShadowPage, i: int, gfn: int) -> None:
        self.note(sp, gfn, i)

    def _gfn(self, gfn: int) -> None:
        self.gfns.add(gfn)

    rmap_write_protect = pte_write = _gfn

    def dirty_log_protect(self, slot: Memslot, first_word: int, words: np.ndarray) -> None:
        self.gfns.update((bitmap_pages(first_word, words) + slot.base_gfn).tolist())


def _incremental_pages(
    mmu: KvmMmu, track: AuditTrack
) -> tuple[list[ShadowPage], list[set[int] | None], list[ShadowPage]]:
    """What an incremental run checks: (pages, their entries, neighbours).

    Pages are those touched and those of touched gfns; each with the entries to check
    (None: all of them — a page changed as a whole, or one shadowing a touched gfn).
    Neighbours — pages holding rmap entries of touched gfns, parents and children — get the
    link checks only: their entries did not change, and the rmap entries of touched gfns
    are checked from the rmap side by rmap_exact.
    """
    pool = mmu.pool.pages
    active = mmu.active_mmu_pages
    whole: set[ShadowPage] = set(track.sps)
    near: dict[ShadowPage, None] = {}
    for gfn in sorted(track.gfns):
        whole.update(mmu.valid_sps_of_gfn(gfn))
        slot = mmu.memslots.lookup(gfn)
        if slot is not None:
            near.update(dict.fromkeys(pool[sptep_page(p)] for p in slot.rmap.get(gfn)))
    found = whole | set(track.entries)
    for sp in found:
        near.update(dict.fromkeys(pool[sptep_page(p)] for p in sp.parent_ptes))
        if sp.level > 1:
            near.update(dict.fromkeys(C.children(mmu, sp)))
    pages = sorted((sp for sp in found if sp in active), key=lambda sp: sp.index)
    entries = [None if sp in whole else track.entries[sp] for sp in pages]
    neighbours = sorted((sp for sp in near if sp in active and sp not in found),
                        key=lambda sp: sp.index)
    return pages, entries, neighbours


SCALAR_ENTRIES = 256  # above this many entries, an incremental run uses the vectorised checks


def _run(mmu: KvmMmu, point: str, pages: list[ShadowPage], tree: list[ShadowPage],
         gfns: set[int] | None, synced: set[ShadowPage] | None = None,
         skip_gfn: int | None = None, neighbours: Sequence[ShadowPage] = (),
         entries: list[set[int] | None] | None = None,
         impl: type[PageArrays] | type[PageEntries] | None = None,
         go_on: Callable[[str], bool] = lambda check: True) -> list[str] | None:
    """The checks over `pages` (active-page checks; per-entry checks limited to `entries`)
    and `tree` (walk checks); `neighbours` get the link checks too. A full run (gfns None)
    is vectorised; an incremental one goes entry by entry unless it is large. `impl`
    chooses instead (the tests compare the two). None: `go_on` stopped it."""
    checked: C.CheckedEntries
    if impl is not None:
        checked = impl(mmu, pages, gfns, entries)
    elif gfns is None:
        checked = PageArrays(mmu, pages, gfns, entries)
    else:
        checked = PageEntries(mmu, pages, gfns, entries)
        if checked.size > SCALAR_ENTRIES:
            checked = PageArrays(mmu, pages, gfns, entries)
    walked, rows = checked, C.rows_of(checked.sps, tree)
    if rows is None:
        walked = type(checked)(mmu, tree, gfns)
        rows = list(range(len(tree)))
    return C.run_checks(mmu, checked, walked, rows, point, PT64_ROOT_4LEVEL, gfns, synced,
                        skip_gfn, [*pages, *neighbours], go_on)


def _limit_rmap_reports(messages: list[str], state: ModuleAudit, now_ns: int, notes: list[str]) -> list[str]:
    """inspect_spte_has_rmap's own limiter: one report = its one or two lines."""
    kept: list[str] = []
    skip_next = False
    for m in messages:
        if skip_next:
            skip_next = False
            continue
        if m.startswith(("no memslot for gfn", "no rmap for writable spte")):
            if not state.rmap_limit.allow(now_ns, notes):
                skip_next = m.startswith("no memslot")
                continue
        kept.append(m)
    return kept


def kvm_mmu_audit(mmu: KvmMmu, vmmu: VcpuMmu | None, point: str, written_gfn: int | None = None) -> list[str]:
    """One audit run at `point`; returns (and logs) its error lines.

    written_gfn: at `pre pte write`, the table the guest has just written. A store that
    switches the audit off here, or between the run's checks, ends it without a report.
    """
    if not store_point(mmu, point):
        return []
    if mmu.audit_track is not None and point in _PRE_POINTS:
        return []  # incremental: a pre point opens the operation its post point checks
    state = mmu.module_audit
    now = mmu.clock_ns()
    notes: list[str] = []
    allowed = state.run_limit.allow(now, notes)
    _log_lines(state, notes, point, now, warning=True)
    if not allowed:
        mmu.stat["mmu_audit_ratelimited"] += 1
        return []
    mmu.stat["mmu_audit_runs"] += 1
    vcpus = [vmmu] if vmmu is not None else mmu.vcpus
    track = mmu.audit_track
    synced = None
    neighbours: list[ShadowPage] = []
    entries = None
    if track is None:
        pages = list(reversed(mmu.active_mmu_pages))
        tree = [sp for v in vcpus if v.root is not None for sp in C.reachable_pages(mmu, v.root)]
        gfns = None
    else:
        if point == AUDIT_POST_SYNC:
            # What the sync was to cover: the root's unsync paths, whether touched or not.
            for v in vcpus:
                if v.root is not None:
                    track.sps.update(C.unsync_paths(mmu, v.root))
        pages, entries, neighbours = _incremental_pages(mmu, track)
        tree = pages
        gfns = set(track.gfns)
        track.clear()
        if point == AUDIT_POST_SYNC:
            synced = {sp for sp in pages for v in vcpus if v.root and C.reaches(mmu, sp, v.root)}
    messages = _run(mmu, point, pages, tree, gfns, synced, written_gfn, neighbours, entries,
                    go_on=lambda check: store_point(mmu, f"{point} before {check}"))
    if messages is None:
        return []
    messages = _limit_rmap_reports(messages, state, now, notes := [])
    _log_lines(state, notes, point, now, warning=True)
    lines = [f"audit: ({point}) error: {m}" for m in messages]
    mmu.stat["mmu_audit_errors"] += len(lines)
    _log_lines(state, lines, point, now, warning=False)
    return lines


def _log_lines(state: ModuleAudit, lines: list[str], point: str, now_ns: int, *,
               warning: bool) -> None:
    """Append to kvm/audit_log (every line) and copy to structlog: the limiters' notes as
    warnings, the error lines as `mmu_audit_error` events through `error_log_limit`.  The
    first event of a window after refused ones is a summary: "N events suppressed"."""
    for line in lines:
        state.lines.append(line)
        if warning:
            log.warning("mmu_audit_suppressed", point=point, message=line.rstrip("\n"))
            continue
        limit = state.error_log_limit
        missed, resumed = limit.missed, list[str]()
        if not limit.allow(now_ns, resumed):
            continue
        if resumed:
            log.error("mmu_audit_error", point=point, suppressed=missed,
                      message=f"{missed} events suppressed")
        log.error("mmu_audit_error", point=point, message=line.rstrip("\n"))


def audit_full(mmu: KvmMmu, vcpus: list[VcpuMmu], point: str) -> list[str]:
    """A full run now, outside the limiter and the log (vm.audit(), tests)."""
    pages = list(reversed(mmu.active_mmu_pages))
    tree = [sp for v in vcpus if v.root is not None for sp in C.reachable_pages(mmu, v.root)]
    messages = _run(mmu, point, pages, tree, None)
    assert messages is not None  # nothing stops it
    return [f"audit: ({point}) error: {m}" for m in messages]
