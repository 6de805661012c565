"""The tracefs files of the top-level instance (/sys/kernel/tracing, Linux v5.16), rendered
and applied in the simulation: `TraceFs.read(file)`, `.write(file, text)`, `.truncate(file)`
and `.pipe(size)` (trace_pipe's consuming read). `file` is the path under tracing/, e.g.
`events/kvmmmu/kvm_mmu_get_page/filter`. A refused write raises OSError(EINVAL).
docs/tracing.md lists the files.
"""

from __future__ import annotations

import errno
import re
from collections import deque

from mmud.kvm.trace.events import COMMON_FIELDS, EVENTS, SYSTEMS, select
from mmud.kvm.trace.filter import FilterError, compile_filter
from mmud.kvm.trace.ring import CpuRing
from mmud.kvm.trace.tracer import ModuleTrace, format_line, lost_line, trace_ts

# err_text[] of kernel/trace/trace_events_filter.c (v5.16), for the messages filter.py raises.
_FILTER_ERRORS = (
    ("no field", "Field not found"),
    ("bad operator", "Invalid operator"),
    ("missing ')'", "Too many '('"),
    ("bad number", "Illegal integer value"),
)
_MEANINGLESS = "Meaningless filter expression"

# print_func_help_header_irq() without record-tgid (v5.16).
_HEADER = (
    "#                                _-----=> irqs-off\n"
    "#                               / _----=> need-resched\n"
    "#                              | / _---=> hardirq/softirq\n"
    "#                              || / _--=> preempt-depth\n"
    "#                              ||| / _-=> migrate-disable\n"
    "#                              |||| /     delay\n"
    "#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION\n"
    "#              | |         |   |||||     |         |\n"
)

_EVENT_FILE = re.compile(r"events/(\w+)/(\w+)/(enable|format|filter)")
_SYSTEM_ENABLE = re.compile(r"events/(\w+)/enable")
_CPU_STATS = re.compile(r"per_cpu/cpu(\d+)/stats")


def _enable_set(file: str) -> set[str] | None:
    """The events an `events/enable` or `events/<system>/enable` file covers (None: neither)."""
    if file == "events/enable":
        return set(EVENTS)
    m = _SYSTEM_ENABLE.fullmatch(file)
    if m is None or m[1] not in SYSTEMS:
        return None
    return {n for n, e in EVENTS.items() if e.system == m[1]}


def _event_file(file: str) -> tuple[str, str] | None:
    """(event, file kind) of `events/<system>/<event>/<kind>`, None if there is no such file."""
    m = _EVENT_FILE.fullmatch(file)
    if m is None or m[2] not in EVENTS or EVENTS[m[2]].system != m[1]:
        return None
    return m[2], m[3]


def _einval(message: str) -> OSError:
    return OSError(errno.EINVAL, message)


def parse_error_text(text: str, error: FilterError) -> str:
    """What the filter file shows after a filter that does not parse (append_filter_err):
    the filter, a caret under the offending token, `parse_error: <err_text>`."""
    message = str(error)
    kind = next((k for prefix, k in _FILTER_ERRORS if message.startswith(prefix)), _MEANINGLESS)
    token = re.search(r"'([^']*)'", message)
    pos = text.find(token[1]) if token else -1
    pos = len(text) if pos < 0 else pos
    if pos:
        pos += 1  # "indexing is off by one"
    return f"{text}\n{'^':>{pos}}\nparse_error: {kind}\n"


class TraceFs:
    """tracing/ over the module's top-level instance."""

    def __init__(self, module: ModuleTrace) -> None:
        self.module = module
        self.top = module.top
        self.filter_text: dict[str, str] = {}  # what each event's filter file shows
        self._pending: deque[str] = deque()  # trace_pipe text consumed but not yet read

    # -- reading ------------------------------------------------------------------------------

    def read(self, file: str) -> str:
        top = self.top
        if file == "available_events":
            return "".join(f"{e.system}:{n}\n" for n, e in EVENTS.items())
        if file == "set_event":
            return "".join(f"{e.system}:{n}\n" for n, e in EVENTS.items() if n in top.enabled)
        covered = _enable_set(file)
        if covered is not None:
            on = len(top.enabled & covered)
            return "0\n" if not on else "1\n" if on == len(covered) else "X\n"
        if file == "tracing_on":
            return f"{int(top.tracing_on)}\n"
        if file == "buffer_size_kb":
            return f"{top.buffer_size_kb}\n"
        if file == "trace":
            return self._trace()
        if (m := _CPU_STATS.fullmatch(file)) is not None:
            return self._cpu_stats(int(m[1]))
        found = _event_file(file)
        if found is None:
            raise OSError(errno.ENOENT, file)
        name, kind = found
        if kind == "enable":
            return f"{int(name in top.enabled)}\n"
        if kind == "format":
            return EVENTS[name].format_file()
        return f"{self.filter_text[name]}\n" if name in self.filter_text else "none\n"

    def _cpus(self) -> int:
        return max([len(vm.mmu.vcpus) for vm in self.module.vms()] + [*(c + 1 for c in self.top.rings), 1])

    def _cpu_stats(self, cpu: int) -> str:
        """per_cpu/cpu<N>/stats (tracing_stats_read, v5.16): the CPU's ring, its oldest event
        and the clock now (the newest VM clock of the module; the trace clock is simulated).
        Reading creates no ring: a CPU that recorded nothing shows an empty one."""
        ring = self.top.rings.get(cpu) or CpuRing(cpu, self.top.buffer_size)
        oldest = ring.peek()
        now = max([vm.clock() for vm in self.module.vms()] + [0])
        return (f"entries: {ring.entries}\noverrun: {ring.overrun}\ncommit overrun: 0\n"
                f"bytes: {ring.bytes}\noldest event ts: {trace_ts(0 if oldest is None else oldest.ts)}\n"
                f"now ts: {trace_ts(now)}\ndropped events: 0\nread events: {ring.read_events}\n")

    def _trace(self) -> str:
        rings = self.top.rings.values()
        entries = sum(r.entries for r in rings)
        total = entries + sum(r.overrun for r in rings)
        records = sorted((r for ring in rings for r in ring.records()), key=lambda r: (r.ts, r.cpu))
        head = (f"# tracer: nop\n#\n# entries-in-buffer/entries-written: {entries}/{total}"
                f"   #P:{self._cpus()}\n#\n{_HEADER}")
        return head + "".join(format_line(r) + "\n" for r in records)

    def pipe(self, size: int) -> str:
        """trace_pipe: consume whole lines, oldest first, up to `size` bytes (at least one
        line when there is one); '' when the buffer is empty. One stream for every reader."""
        out: list[str] = []
        used = 0
        while True:
            if not self._pending:
                got = self.top.consume()
                if got is None:
                    break
                record, lost = got
                if lost:
                    self._pending.append(lost_line(record.cpu, lost) + "\n")
                self._pending.append(format_line(record) + "\n")
            line = self._pending[0]
            if out and used + len(line) > size:
                break
            out.append(self._pending.popleft())
            used += len(line)
        return "".join(out)

    # -- writing ------------------------------------------------------------------------------

    def truncate(self, file: str) -> None:
        """An O_TRUNC open: `set_event` clears every event (ftrace_event_set_open), `trace`
        clears the buffers (tracing_open); other files ignore it."""
        if file == "set_event":
            self.top.set_enabled(set(EVENTS), False)
        elif file == "trace":
            self.top.reset()
            self._pending.clear()

    def write(self, file: str, text: str) -> None:
        top = self.top
        if file == "set_event":
            for word in text.split():  # ftrace_event_write: one pattern per word
                on = not word.startswith("!")
                try:
                    names = select(word[0 if on else 1:])
                except ValueError as e:
                    raise _einval(str(e)) from None
                top.set_enabled(names, on)
        elif (covered := _enable_set(file)) is not None:
            top.set_enabled(covered, _zero_one(text))
        elif file == "tracing_on":
            top.tracing_on = bool(_number(text))
        elif file == "buffer_size_kb":
            kb = _number(text)
            if not kb:
                raise _einval("buffer_size_kb must be positive")
            top.buffer_size_kb = kb
        elif file == "trace":
            self.truncate("trace")  # the write itself is ignored (tracing_write_stub)
        elif (found := _event_file(file)) is not None and found[1] != "format":
            if found[1] == "enable":
                top.set_enabled({found[0]}, _zero_one(text))
            else:
                self._set_filter(found[0], text)
        else:
            raise OSError(errno.EACCES, file)

    def _set_filter(self, name: str, text: str) -> None:
        """apply_event_filter() (v5.16): `0` clears; a filter that does not parse fails with
        EINVAL, and the event is left unfiltered with the parse error in its filter file."""
        text = text.rstrip()
        if text.strip() == "0":
            self.top.set_filter({name}, "0")
            self.filter_text.pop(name, None)
            return
        fields = {f.name for f in (*COMMON_FIELDS, *EVENTS[name].fields)}
        try:
            compile_filter(text, fields)
        except FilterError as e:
            self.top.filters.pop(name, None)
            self.filter_text[name] = parse_error_text(text, e)  # shown as "%s\n"
            raise _einval(str(e)) from None
        self.top.set_filter({name}, text)
        self.filter_text[name] = text


def _number(text: str) -> int:
    """kstrtoul(…, 10) of a tracefs write: digits and one optional newline."""
    m = re.fullmatch(r"\+?([0-9]+)\n?", text)
    if m is None:
        raise _einval(f"not a number: {text!r}")
    return int(m[1])


def _zero_one(text: str) -> bool:
    value = _number(text)
    if value not in (0, 1):
        raise _einval("0 or 1")
    return bool(value)
