"""Live migration by pre-copy, as a VMM does it with KVM's dirty log.

Turn dirty logging on in every memslot of the source, send all of its RAM, then send in
rounds what the guest dirtied meanwhile (one KVM_GET_DIRTY_LOG per slot per round) while
the source keeps running, until a round leaves few enough dirty pages; then stop the
source, send the rest and compare: the destination's RAM must equal the source's at the
stop. Any page the dirty log lost shows up as a difference.

The destination is a fresh VM with the same memslots; what moves is guest memory, which
is what the dirty log covers (vCPU registers and the guest model are not migrated).
`Migration.run()` is a generator that yields wherever the source may run — between chunks
of the first copy and between rounds — so a caller interleaves it with the source's steps
(`migrate()` here, the daemon's loop for vm<N>/migrate).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np

from mmud.kvm.memslot import Memslot
from mmud.machine import VM
from mmud.x86.paging import PAGE_SHIFT, PAGE_SIZE

# Pages sent between two chances for the source to run during the first full copy.
COPY_CHUNK_PAGES = 4096
# A round that leaves at most this many dirty pages ends the live phase (the downtime's size).
DIRTY_THRESHOLD_PAGES = 64
# The live phase ends after this many rounds even if the guest dirties faster than we send.
MAX_ROUNDS = 30
# Scheduler steps the source runs per yield when migrate() drives it.
SOURCE_STEPS = 200


@dataclass(frozen=True)
class Round:
    pages_sent: int
    dirty_left: int  # pages the guest dirtied while this round was sent


@dataclass
class MigrationResult:
    rounds: list[Round] = field(default_factory=list)  # round 0 is the full copy
    final_pages: int = 0  # sent with the source stopped
    identical: bool | None = None  # destination RAM == source RAM at the stop
    mismatched_pages: int = 0
    cancelled: bool = False  # the destination went away before the stop (Migration.cancel)
    dest: VM | None = field(default=None, repr=False)

    @property
    def pages_sent(self) -> int:
        return sum(r.pages_sent for r in self.rounds) + self.final_pages

    def render(self) -> str:
        """The vm<N>/migrate text: one line per round, then the result."""
        lines = [f"round {i}: sent {r.pages_sent} pages, {r.dirty_left} dirty left"
                 for i, r in enumerate(self.rounds)]
        if self.identical is not None:
            lines.append(f"stopped: sent {self.final_pages} pages")
            verdict = "identical" if self.identical else f"{self.mismatched_pages} pages differ"
            lines.append(f"result: {verdict}, {self.pages_sent} pages sent in "
                         f"{len(self.rounds)} rounds")
        elif self.cancelled:
            lines.append(f"result: cancelled, the destination is gone; {self.pages_sent} pages "
                         f"sent in {len(self.rounds)} rounds")
        return "".join(line + "\n" for line in lines)


def _pages(slot: Memslot) -> np.ndarray:
    """The slot's RAM as one row of 512 words per page."""
    return slot.backing.array.reshape(slot.npages, PAGE_SIZE // 8)


def _dirty_pages(bitmap: bytes, npages: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
    return np.flatnonzero(bits[:npages])


class Migration:
    """One pre-copy migration of `source` into `dest`."""

    def __init__(self, source: VM, dest: VM) -> None:
        self.source, self.dest = source, dest
        self.result = MigrationResult(dest=dest)
        self.slots = list(source.memslots)
        self.flags = {s.id: s.log_dirty for s in self.slots}
        self.logging = False  # dirty logging turned on in the source by this migration

    @classmethod
    def to_new_vm(cls, source: VM) -> Migration:
        """A destination with the source's memslots, not running anything yet."""
        dest = VM(mem_mb=source.mem_mb, vcpus=len(source.vcpus), seed=source.seed,
                  module=source.module)
        for slot in source.memslots:
            if slot.id not in dest.memslots.slots:
                dest.set_memslot(slot.id, slot.base_gfn << PAGE_SHIFT, slot.npages * PAGE_SIZE)
        return cls(source, dest)

    def _send(self, slot: Memslot, pages: np.ndarray) -> int:
        _pages(self.dest.memslots.slots[slot.id])[pages] = _pages(slot)[pages]
        return len(pages)

    def _collect_and_send(self) -> int:
        """Every slot's dirty log, then its dirty pages; the pages sent."""
        return sum(self._send(slot, _dirty_pages(self.source.get_dirty_log(slot.id), slot.npages))
                   for slot in self.slots)

    def run(self) -> Generator[None, None, MigrationResult]:
        source, result = self.source, self.result
        for slot in self.slots:
            source.log_dirty_pages(slot.id)
        self.logging = True
        sent = 0
        for slot in self.slots:
            for first in range(0, slot.npages, COPY_CHUNK_PAGES):
                sent += self._send(slot, np.arange(first, min(slot.npages, first + COPY_CHUNK_PAGES)))
                yield
        left = self._dirty_count()
        result.rounds.append(Round(sent, left))
        while left > DIRTY_THRESHOLD_PAGES and len(result.rounds) < MAX_ROUNDS:
            sent = self._collect_and_send()
            yield  # the guest runs while the round is on the wire
            left = self._dirty_count()
            result.rounds.append(Round(sent, left))
        # The source stops here: the caller runs no more of its steps.
        result.final_pages = self._collect_and_send()
        self._verify()
        self._restore_flags()
        return result

    def _restore_flags(self) -> None:
        """Dirty logging in the source back to what it was before the migration."""
        for slot in self.slots:
            self.source.log_dirty_pages(slot.id, self.flags[slot.id])
        self.logging = False

    def cancel(self) -> None:
        """Stop before the end, as a VMM does when the destination dies: the source keeps
        running with its dirty logging as before, the result says `cancelled` and no longer
        holds the destination; the caller drops this object and the generator of run(), the
        last references to it."""
        if self.logging:
            self._restore_flags()
        self.result.cancelled = True
        self.result.dest = None

    def _dirty_count(self) -> int:
        """Pages dirtied since the last harvest, over every slot."""
        return sum(int(np.unpackbits(s.dirty_bitmap.view(np.uint8)).sum()) for s in self.slots)

    def _verify(self) -> None:
        differ = 0
        for slot in self.slots:
            src, dst = _pages(slot), _pages(self.dest.memslots.slots[slot.id])
            differ += int((src != dst).any(axis=1).sum())
        self.result.mismatched_pages = differ
        self.result.identical = differ == 0


def migrate(source: VM, source_steps: int = SOURCE_STEPS) -> MigrationResult:
    """Migrate a running VM into a new one (`result.dest`); the source runs `source_steps`
    steps wherever the migration lets it, and is left stopped (not stepped) at the end."""
    run = Migration.to_new_vm(source).run()
    while True:
        try:
            next(run)
        except StopIteration as done:
            return done.value
        source.step(source_steps)
