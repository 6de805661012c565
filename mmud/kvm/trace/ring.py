"""ftrace's per-CPU ring buffer in overwrite mode (kernel/trace/ring_buffer.c, v5.16).

A CPU's buffer is `nr_pages` pages of BUF_PAGE_SIZE bytes of events each. An event takes a
4-byte header plus its payload (rb_calculate_event_length), and a time-extend event of 8
bytes goes before one whose delta from the previous event does not fit the header's 27
bits. When the writer needs a page and all are full it takes the oldest one: the events on it
are lost, counted in `overrun`, and the next read reports how many it missed (the
`CPU:%d [LOST %lu EVENTS]` line of trace and trace_pipe).

Simplification: the kernel's reader page (one page beyond nr_pages, swapped in by the first
read) is not modelled, so the buffer holds nr_pages pages before and after reading.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from mmud.kvm.trace.events import Event

PAGE_SIZE = 4096
BUF_PAGE_HDR_SIZE = 16  # u64 time_stamp + local_t commit
BUF_PAGE_SIZE = PAGE_SIZE - BUF_PAGE_HDR_SIZE
RB_EVNT_HDR_SIZE = 4
RB_MAX_SMALL_DATA = 28 * 4
RB_LEN_TIME_EXTEND = 8
TS_DELTA_BITS = 27
# kernel/trace/trace.c: 16384 * 88 (sizeof(struct print_entry)), per CPU: buffer_size_kb 1408.
TRACE_BUF_SIZE_DEFAULT = 1441792


def event_length(payload: int) -> int:
    """rb_calculate_event_length() on x86-64 (4-byte alignment)."""
    length = payload or 1
    if length > RB_MAX_SMALL_DATA:
        length += 4  # the length moves out of the header into array[0]
    length += RB_EVNT_HDR_SIZE
    return (length + 3) & ~3


@dataclass(slots=True)
class Record:
    """One event in a ring: `struct trace_entry` plus the event's field values."""

    event: Event
    values: tuple[int, ...]
    ts: int  # ns, the VM's simulated clock
    cpu: int
    pid: int
    comm: str
    flags: int
    preempt_count: int


class CpuRing:
    """One CPU's buffer."""

    def __init__(self, cpu: int, size: int = TRACE_BUF_SIZE_DEFAULT) -> None:
        self.cpu = cpu
        self.resize(size)
        self.pages: deque[list[Record]] = deque()
        self.tail_used = 0  # bytes used on the newest page
        self.last_ts = 0
        self.overrun = 0  # events lost to overwriting, since the buffer was reset
        self.missed = 0  # lost since the last read: the next read reports them
        self.entries = 0  # events in the buffer
        self.written = 0
        self.read_events = 0
        self.bytes = 0  # event bytes in the buffer, not yet read (per_cpu/cpu*/stats `bytes`)

    def resize(self, size: int) -> None:
        """buffer_size_kb: `size` bytes, rounded up to whole pages, at least two."""
        self.size = size
        self.nr_pages = max(2, -(-size // BUF_PAGE_SIZE))

    def write(self, record: Record) -> None:
        length = event_length(record.event.size)
        if self.pages and record.ts - self.last_ts >= 1 << TS_DELTA_BITS:
            length += RB_LEN_TIME_EXTEND
        if not self.pages or self.tail_used + length > BUF_PAGE_SIZE:
            if len(self.pages) == self.nr_pages:
                dropped = self.pages.popleft()
                lost = len(dropped)
                self.bytes -= sum(event_length(r.event.size) for r in dropped)
                self.overrun += lost
                self.missed += lost
                self.entries -= lost
            self.pages.append([])
            self.tail_used = 0
            length = event_length(record.event.size)  # a page starts with a full time stamp
        self.pages[-1].append(record)
        self.tail_used += length
        self.bytes += event_length(record.event.size)
        self.last_ts = record.ts
        self.entries += 1
        self.written += 1

    def peek(self) -> Record | None:
        return self.pages[0][0] if self.pages else None

    def consume(self) -> tuple[Record, int]:
        """The oldest event, and how many were lost before it since the last read."""
        page = self.pages[0]
        record = page.pop(0)
        if not page:
            self.pages.popleft()
            if not self.pages:
                self.tail_used = 0
        self.entries -= 1
        self.bytes -= event_length(record.event.size)
        self.read_events += 1
        missed, self.missed = self.missed, 0
        return record, missed

    def records(self) -> list[Record]:
        """Every event in the buffer, oldest first (the `trace` file: reading does not consume)."""
        return [r for page in self.pages for r in page]

    def reset(self) -> None:
        self.pages.clear()
        self.tail_used = 0
        self.overrun = self.missed = self.entries = self.written = self.read_events = 0
        self.bytes = 0
