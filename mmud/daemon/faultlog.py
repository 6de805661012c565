"""The isolation fault log leaves the simulation: published, logged, and kept on disk.

`kvm/fault_log` shows the module's log as the kernel's ring does — cleared when a VM is
created — and `kvm/isolation/faults` mmud's table of the logged faults with their counts.
So that a restart of the VM or of the daemon loses nothing already logged, each new entry
also becomes a structlog event and one JSON line appended to `<state-dir>/fault_log.jsonl`,
and `kvm/isolation/history` shows the table rows of those records, earlier runs first.
Both happen between step batches, in the simulation process (never in a FUSE callback), and
only for entries the log has not handed out before.

The state directory may be full or failing; the simulation goes on regardless.  Each record
is one complete line written by a single `os.write` on an `O_APPEND` descriptor; a short
write is undone (truncated back), so a record is in the file whole or not at all.  A failed
write is counted (`state write failures:` in `vm<N>/status`) and logged once per episode
(`state_write_failed`, then `state_write_recovered` at the next success).  Before a record
would take the file past `ROTATE_BYTES` the file becomes `fault_log.jsonl.1` (one old file
kept), so the history is bounded.  A reader skips torn and unparseable lines.
"""

from __future__ import annotations

import errno
import json
import os
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from mmud.kvm.isolation import ModuleIsolation
from mmud.kvm.isolation.faultlog import TABLE_HEADER, Pending, table_row

HISTORY = "fault_log.jsonl"
ROTATE_BYTES = 1 << 20  # fault_log.jsonl becomes fault_log.jsonl.1 before it would pass 1 MiB
READ_BYTES = 2 << 20  # at start, at most this much of each file's end is read back
HISTORY_ROWS = 8192  # kvm/isolation/history shows at most the newest this many rows

# kvm/isolation/history: the faults table's columns behind the run and the VM.
HISTORY_HEADER = f"{'run':>5} {'vm':<6} {TABLE_HEADER}"

# A VM (the `Kvm` a pending entry names) -> what a record says of it: {"vm": name, "seed": …,
# "step": …}; {} for a VM the caller does not know (any more).
Describe = Callable[[Any], dict[str, Any]]

log = structlog.get_logger("mmud.isolation")


def _word(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and " " not in value


def history_row(record: Any) -> str | None:
    """The kvm/isolation/history row of one persisted record; None for a record that has no
    table row (a switch-fault report, a record of an older format, a foreign line)."""
    if not isinstance(record, dict):
        return None
    r: dict[str, Any] = record
    vm = r.get("vm")
    if not (all(type(r.get(k)) is int for k in ("run", "entry", "count"))
            and all(_word(r.get(k)) for k in ("ip", "address", "object"))
            and (vm is None or _word(vm))):
        return None
    return (f"{r['run']:>5} {vm or '-':<6} "
            f"{table_row(r['entry'], r['ip'], r['address'], r['object'])}{r['count']}")


def read_records(path: Path, limit: int = READ_BYTES) -> Iterator[dict[str, Any]]:
    """The records of one history file in order, from at most its last `limit` bytes.

    A torn line (a write cut short by a crash) and any other line that is not a JSON object
    are skipped (and counted in one `state_lines_skipped` warning), never fatal.
    """
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            data = f.read()
    except FileNotFoundError:
        return
    except OSError as e:
        log.warning("state_read_failed", path=str(path), errno=e.errno,
                    error=errno.errorcode.get(e.errno or 0, "?"), message=e.strerror)
        return
    lines = data.split(b"\n")
    if size > limit:
        lines = lines[1:]  # the first line was cut by the limit
    skipped = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            yield record
        else:
            skipped += 1
    if skipped:
        log.warning("state_lines_skipped", path=str(path), lines=skipped)


class HistoryFile:
    """`<state-dir>/fault_log.jsonl` and its one rotated predecessor `fault_log.jsonl.1`.

    Writes go through one `O_APPEND` descriptor, kept open between records.  `failures`
    counts the records that could not be written; none of them raises.
    """

    def __init__(self, path: Path, rotate_bytes: int) -> None:
        self.path = path
        self.old = path.with_name(path.name + ".1")
        self.rotate_bytes = rotate_bytes
        self.failures = 0  # records lost to a failed write, open or rotation
        self._fd: int | None = None
        self._torn = False  # the file does not end with a newline (a crash cut a write)
        self._failing = False  # in a failure episode: logged once, until the next success
        self._lost = 0  # records lost in the current episode

    def records(self) -> Iterator[dict[str, Any]]:
        """Every readable record, oldest first (the rotated file, then the current one)."""
        yield from read_records(self.old)
        yield from read_records(self.path)

    def append(self, line: bytes) -> bool:
        """Write one record (a complete line) whole, or not at all; False if not."""
        try:
            self._append(line)
        except OSError as e:
            self.failures += 1
            self._lost += 1
            self.close()  # open afresh at the next record
            if not self._failing:
                self._failing = True
                log.error("state_write_failed", path=str(self.path), errno=e.errno,
                          error=errno.errorcode.get(e.errno or 0, "?"), message=e.strerror)
            return False
        if self._failing:
            self._failing = False
            log.info("state_write_recovered", path=str(self.path), lost=self._lost)
            self._lost = 0
        return True

    def _append(self, line: bytes) -> None:
        fd = self._open()
        st = os.fstat(fd)
        size = st.st_size
        if st.st_nlink == 0:  # removed under us: start a new file
            self.close()
            fd = self._open()
            size = os.fstat(fd).st_size
        if size and size + len(line) > self.rotate_bytes:
            self.close()
            os.replace(self.path, self.old)
            log.info("state_rotated", path=str(self.path), to=str(self.old), size=size)
            fd = self._open()
            size = os.fstat(fd).st_size
        data = b"\n" + line if self._torn else line  # a torn last line stays a line of its own
        written = os.write(fd, data)
        if written != len(data):
            os.ftruncate(fd, size)  # undo the part that got in: a record is whole or absent
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes), undone")
        self._torn = False

    def _open(self) -> int:
        if self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            size = os.fstat(fd).st_size
            self._torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
            self._fd = fd
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class FaultLogPublisher:
    def __init__(self, module: ModuleIsolation, state_dir: str | None, *,
                 rotate_bytes: int | None = None) -> None:
        self.module = module
        self.file = (HistoryFile(Path(state_dir) / HISTORY, rotate_bytes or ROTATE_BYTES)
                     if state_dir else None)
        # kvm/isolation/history: the rows of earlier runs, then this run's as they come.
        self.history: deque[str] = deque(maxlen=HISTORY_ROWS)
        last_run = 0
        for record in self.file.records() if self.file else ():
            if type(run := record.get("run")) is int:
                last_run = max(last_run, run)
            if (row := history_row(record)) is not None:
                self.history.append(row)
        self.run = last_run + 1  # this run's id: one more than the newest in the history
        # What `describe` said of each VM, for its entries still pending once it is gone.
        self._known: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
        self._history_version, self._history_seen = 0, -1
        self._history: tuple[str, ...] = ()
        self._version = -1
        self._lines: tuple[str, ...] = ()
        self._table_version = -1
        self._table: tuple[str, ...] = ()

    @property
    def state_write_failures(self) -> int | None:
        """Records the state directory refused so far (None: no state directory)."""
        return self.file.failures if self.file else None

    def logs(self, describe: Describe) -> dict[str, tuple[str, ...]]:
        """The snapshot's `fault_log`, `isolation/faults`, `isolation/history` and
        `isolation/mappings`; new entries persisted first, each credited to its VM through
        `describe`.  The logs and the table are copied only when their version moved (the
        table's moves with every repeated fault, the others' only with new entries)."""
        self._persist(describe)
        fault_log = self.module.log
        if fault_log.version != self._version:
            self._lines, self._version = tuple(fault_log.lines), fault_log.version
        if fault_log.table_version != self._table_version:
            self._table, self._table_version = fault_log.table_lines(), fault_log.table_version
        if self._history_version != self._history_seen:
            self._history = (HISTORY_HEADER, *self.history)
            self._history_seen = self._history_version
        return {"fault_log": self._lines, "isolation/faults": self._table,
                "isolation/history": self._history, "isolation/mappings": self.module.mm.lines()}

    def record(self, entry: Pending, describe: Describe) -> dict[str, Any]:
        """One persisted record: the run, whose fault (vm, seed, step), the table's columns
        (count: the IP's count now) and the kernel lines."""
        out: dict[str, Any] = {"run": self.run, "vm": None}
        if entry.vm is not None:
            said = {**self._known.get(entry.vm, {}), **describe(entry.vm)}
            self._known[entry.vm] = said
            out.update(said)
        if (row := entry.row) is not None:
            out.update(entry=row.entry, ip=row.ip, address=f"{row.address:016x}",
                       object=row.object, count=self.module.log.count(row.key))
        out["lines"] = list(entry.lines)
        return out

    def _persist(self, describe: Describe) -> None:
        for entry in self.module.log.take_pending():
            record = self.record(entry, describe)
            log.info("isolation_fault", **record)
            if (row := history_row(record)) is not None:
                self.history.append(row)
                self._history_version += 1
            if self.file is not None:
                self.file.append(json.dumps(record).encode() + b"\n")
