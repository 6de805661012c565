"""The recording of a daemon run: its format, the file it is written to, and the digests.

A run driven through the control files is reproducible only if it is known where in the
simulation each write landed.  The simulation process therefore writes, while it runs,
`<state-dir>/recordings/<UTC start time>.jsonl` (docs/replay.md):

- the first line is the configuration: `{"format": "mmud-recording", "version": "1.0",
  "mmud": …, "started": …, "checkpoint_steps": K, "load": {…}, "vms": [{…}, …]}`;
- then one line per event that changed the simulation, in the order it was applied: every
  request that is not a read (`sim.READ_OPS`), with its arguments exactly as dispatched, the
  errno it got, a global sequence number and every VM's step count at that moment — for a
  parameter store taken inside a step, also the VM stepping (`in`) and the module's count of
  audit store points passed (`point`); and the loop's own events that depend on wall-clock
  time (a pre-copy round of a migration, a VM that crashed in its chunk);
- a checkpoint line each time a VM's step count passes a multiple of K, and one per VM at
  the stop: a digest of its state (`digest`), a dict of named parts so that a replay that
  differs names what differs.

Each line is written whole by one `os.write` on an `O_APPEND` descriptor (a short write is
undone), so a reader never sees half a line.  The file is capped at `CAP_BYTES`; at the cap,
or at the first failed write (a full disk), one `recording_stopped` event is logged and the
recording stops while the run goes on.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import struct
import zlib
from dataclasses import asdict
from datetime import datetime, timezone
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import structlog

import mmud
from mmud.daemon.protocol import SimConfig, VmConfig
from mmud.hostmem import resident_pages
from mmud.x86.paging import PAGE_SIZE
from mmud.machine import VM

FORMAT = "mmud-recording"
VERSION = "1.1"  # a reader refuses a newer major version; a minor one only adds fields
# A checkpoint every this many steps of a VM: about one per second of a running VM at the
# loop's usual speed, each reading the guest RAM the host has mapped (docs/replay.md).
CHECKPOINT_STEPS = 50_000
# A run's recording stops at this size (requests are small; bulk memory writes dominate).
CAP_BYTES = 256 << 20
RECORDINGS = "recordings"  # the directory under the state directory
READ_CHUNK = 128 << 10  # bytes of vm<N>/recording per request (as vm<N>/memory's)
# Statistics kept by the audit itself: their own part of a digest, so that a replay with the
# audit at every point (`mmud replay --audit`) differs from the run in that part only.
AUDIT_STATS = ("mmu_audit_runs", "mmu_audit_ratelimited", "mmu_audit_errors")
# The digest's parts, in the order a divergence is looked for.
PARTS = ("steps", "state", "clock_ns", "memslots", "memory", "dirty_log", "mmu", "stats",
         "audit", "fault_log")

log = structlog.get_logger("mmud.recording")


def mmud_version() -> str:
    """The installed package's version, for the first line."""
    try:
        return version("mmud")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


@cache
def code_digest() -> str:
    """A hash of the package's source: a replay by other code than the run's may differ
    for that reason alone, which the version number does not tell during development."""
    root = Path(mmud.__file__).parent
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


class SlotView(Protocol):
    """What a digest reads of one VM of the simulation (sim._Slot)."""

    name: str
    vm: VM
    failure: str | None

    @property
    def state(self) -> str: ...


def header(config: SimConfig, started: str) -> dict[str, Any]:
    """The first line: everything that builds the run before its first event."""
    return {"format": FORMAT, "version": VERSION, "mmud": mmud_version(), "started": started,
            "code": code_digest(), "checkpoint_steps": CHECKPOINT_STEPS, "load": dict(config.load),
            "vms": [asdict(c) for c in config.vms]}


def config_of(head: dict[str, Any]) -> SimConfig:
    """The SimConfig a recording's first line describes (no state directory: a replay
    writes nothing)."""
    return SimConfig(vms=tuple(VmConfig(**c) for c in head["vms"]), load=dict(head["load"]))


def encode(value: Any) -> Any:
    """A request argument as JSON: bytes (a parameter's text, guest memory) as {"b64": …}."""
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


def decode(value: Any) -> Any:
    """The arguments as they were dispatched, from their JSON form (`encode`)."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        return {k: decode(v) for k, v in value.items()}
    return value


def _hex(h: Any) -> str:
    return str(h.hexdigest())


def _lines_part(lines: Any) -> dict[str, Any]:
    """A log's lines as a digest part: their number and a hash of their text."""
    h = hashlib.blake2b(digest_size=16)
    n = 0
    for line in lines:
        h.update(line.encode())
        n += 1
    return {"lines": n, "hash": _hex(h)}


RAM_CRC_PAGES = 1 << 14  # guest pages copied at a time (64 MiB)


def _ram_crc(ram: np.ndarray, crc: int) -> int:
    """crc32 of every page of guest RAM that holds anything, each after its page number.

    It tells two RAMs apart as a crc of all of it would, but reads only the pages the host
    has mapped (`hostmem.resident_pages`): a checkpoint of a 1 TiB guest costs what the
    guest touched, not a pass over a TiB of zeroes. A page that is mapped but all zero
    counts as one never touched, so what the process happened to read changes nothing."""
    pages = resident_pages(ram)
    words = ram.reshape(-1, PAGE_SIZE // 8)
    for start in range(0, len(pages), RAM_CRC_PAGES):
        chunk = pages[start:start + RAM_CRC_PAGES]
        rows = words[chunk]
        used = rows.any(axis=1)
        block = np.empty((int(used.sum()), 1 + PAGE_SIZE // 8), dtype=np.uint64)
        block[:, 0] = chunk[used]
        block[:, 1:] = rows[used]
        crc = zlib.crc32(block.data, crc)
    return crc


def digest(s: SlotView) -> dict[str, Any]:
    """A VM's state in named parts: its steps, state, clock, memslots, guest RAM, dirty
    bitmaps, the shadow MMU's structure (every active page's gfn, role and sptes, oldest
    first), its statistics, and the module's audit and fault log (shared by every VM)."""
    vm = s.vm
    memory, dirty = 0, 0
    slots = []
    for slot in vm.memslots:
        slots.append([slot.id, slot.base_gfn, slot.npages, slot.flags])
        memory = _ram_crc(slot.backing.array, memory)
        if slot.dirty_bitmap is not None:
            dirty = zlib.crc32(slot.dirty_bitmap, zlib.crc32(b"%d" % slot.id, dirty))
    mmu = hashlib.blake2b(digest_size=16)
    for sp in vm.mmu.active_mmu_pages:
        mmu.update(struct.pack("<QQ?", sp.gfn, sp.role, sp.unsync))
        mmu.update(sp.sptes.data)
    stats = vm.stats
    module = vm.module
    return {
        "steps": vm.steps,
        "state": f"{s.state} {s.failure}" if s.failure else str(s.state),
        "clock_ns": vm.clock_ns,
        "memslots": slots,
        "memory": f"{memory:08x}",
        "dirty_log": f"{dirty:08x}",
        "mmu": f"{len(vm.mmu.active_mmu_pages)} {_hex(mmu)}",
        "stats": {n: v for n, v in stats.items() if n not in AUDIT_STATS},
        "audit": {**{n: stats[n] for n in AUDIT_STATS}, **_lines_part(module.audit.lines)},
        "fault_log": _lines_part(module.isolation.log.lines),
    }


def differing(recorded: dict[str, Any], replayed: dict[str, Any],
              skip: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """The first part in which two digests differ and what differs in it, or None."""
    for part in PARTS:
        if part in skip:
            continue
        a, b = recorded.get(part), replayed.get(part)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = [k for k in (*a, *(k for k in b if k not in a)) if a.get(k) != b.get(k)]
            return part, ", ".join(f"{k}: recorded {a.get(k)}, replayed {b.get(k)}" for k in keys)
        return part, f"recorded {a}, replayed {b}"
    return None


class Recorder:
    """What the simulation tells a recording.  This one keeps nothing (no state directory)
    and is the base of the writer (`Recording`) and of a replay's checker."""

    path: Path | None = None
    stopped: str | None = None  # why a recording stopped early

    def event(self, op: str, args: dict[str, Any], steps: dict[str, int], err: int,
              at: dict[str, Any] | None = None) -> None:
        """One event that changed the simulation, applied at `steps` (and, inside a
        step, at `at`: `{"in": vm, "point": n}`)."""

    def chunk_done(self, s: SlotView, steps: dict[str, int]) -> None:
        """A VM ran one chunk of steps; `steps` are every VM's counts now."""

    def close(self, slots: Sequence[SlotView], steps: dict[str, int]) -> None:
        """The run stops: the last checkpoint of each VM."""

    def read(self, offset: int, size: int) -> bytes:
        """vm<N>/recording: up to READ_CHUNK bytes of the file from `offset`."""
        if self.path is None or size <= 0:
            return b""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, min(size, READ_CHUNK), offset)
        finally:
            os.close(fd)


class Recording(Recorder):
    """The writer of `<state-dir>/recordings/<start>.jsonl`."""

    def __init__(self, state_dir: str, config: SimConfig) -> None:
        now = datetime.now(timezone.utc)
        directory = Path(state_dir) / RECORDINGS
        self.path = directory / f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}.jsonl"
        self.cap_bytes = CAP_BYTES
        self.size = 0
        self.seq = 0
        self._next: dict[int, int] = {}  # id(vm) -> the step count of its next checkpoint
        self._fd: int | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                               | os.O_CLOEXEC, 0o644)
        except OSError as e:
            self._stop("open failed", e)
            return
        self._write(header(config, now.isoformat()))
        if self._fd is not None:
            log.info("recording_started", path=str(self.path))

    def event(self, op: str, args: dict[str, Any], steps: dict[str, int], err: int,
              at: dict[str, Any] | None = None) -> None:
        self.seq += 1
        self._write({"seq": self.seq, "op": op, "args": encode(args), "steps": steps,
                     "errno": err, **(at or {})})

    def chunk_done(self, s: SlotView, steps: dict[str, int]) -> None:
        due = self._next.setdefault(id(s.vm), CHECKPOINT_STEPS)
        if s.vm.steps >= due:
            self._next[id(s.vm)] = (s.vm.steps // CHECKPOINT_STEPS + 1) * CHECKPOINT_STEPS
            self._checkpoint(s, steps, final=False)

    def close(self, slots: Sequence[SlotView], steps: dict[str, int]) -> None:
        for s in slots:
            self._checkpoint(s, steps, final=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _checkpoint(self, s: SlotView, steps: dict[str, int], final: bool) -> None:
        if self._fd is None:
            return  # stopped: spare the digest
        self.seq += 1
        self._write({"seq": self.seq, "checkpoint": s.name, "final": final, "steps": steps,
                     "digest": digest(s)})

    def _write(self, record: dict[str, Any]) -> None:
        """One whole line, or none; the first that cannot be written stops the recording."""
        if self._fd is None:
            return
        try:
            line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        except (TypeError, ValueError) as e:  # an argument JSON cannot hold: a bug, not the run's
            self._stop(f"cannot encode {record.get('op', 'a checkpoint')}: {e}", None)
            return
        if self.size + len(line) > self.cap_bytes:
            self._stop("cap reached", None)
            return
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                os.ftruncate(self._fd, self.size)  # undo the part that got in
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes), undone")
        except OSError as e:
            self._stop("write failed", e)
            return
        self.size += written

    def _stop(self, reason: str, e: OSError | None) -> None:
        """Stop recording for good; the run goes on.  Logged once."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        code = e.errno if e is not None else None
        self.stopped = reason if code is None else f"{reason}: {errno.errorcode.get(code, code)}"
        log.error("recording_stopped", path=str(self.path), reason=reason, errno=code,
                  error=errno.errorcode.get(code, "?") if code else None,
                  message=e.strerror if e is not None else None, size=self.size,
                  cap_bytes=self.cap_bytes)
