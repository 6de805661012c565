"""Node types of the control filesystem and the kernel I/O semantics they carry.

A file renders its whole content from one published `Snapshot` (sysfs-style: the reader
gets a consistent page, never a half-updated one) and, if it is writable, turns one write(2)
into one request to the simulation.  Every store goes the same way: parse and validate here,
in the FUSE process, so a refused value fails with EINVAL/ERANGE and nothing reaches the
simulation; then send the request and wait for the simulation's answer.  New files of later
issues are new instances of these types (or a `RequestFile` with its own parser), not new
I/O code.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Protocol

from mmud.daemon.protocol import Snapshot, VmSnapshot
from mmud.uapi.isolation import parse_map
from mmud.uapi.params import ParamError, Params, kstrtoull
from mmud.uapi.stats import StatDesc

# simple_attr_write() copies at most this many bytes before parsing (fs/libfs.c).
SIMPLE_ATTR_MAX = 23


class Backend(Protocol):
    """What nodes need from the simulation: its latest snapshot and a way to ask it."""

    snapshot: Snapshot | None

    def request(self, op: str, **args: Any) -> Any: ...


Render = Callable[[Snapshot], bytes]
Parse = Callable[[bytes], dict[str, Any]]  # write(2) bytes -> request args; OSError to refuse


class Dir:
    """A directory; `children` may depend on the snapshot (per-VM directories come and go)."""

    mode = 0o755

    def __init__(self, children: Mapping[str, Node] | Callable[[Snapshot], Mapping[str, Node]]):
        self._children = children

    def children(self, snap: Snapshot) -> Mapping[str, Node]:
        return self._children(snap) if callable(self._children) else self._children


class File:
    """A read-only generated file (0444): no store, so even root cannot open it for writing."""

    def __init__(self, render: Render, mode: int = 0o444) -> None:
        self.render = render
        self.mode = mode

    @property
    def writable(self) -> bool:
        return False

    def store(self, data: bytes) -> None:
        raise OSError(errno.EACCES, "no store method")


class RequestFile(File):
    """A writable file: each write(2) is parsed whole, then applied by the simulation."""

    def __init__(self, backend: Backend, render: Render, op: str, parse: Parse,
                 mode: int = 0o644) -> None:
        super().__init__(render, mode)
        self.backend, self.op, self.parse = backend, op, parse

    @property
    def writable(self) -> bool:
        return True

    def store(self, data: bytes) -> None:
        self.backend.request(self.op, **self.parse(data))


class Handle(Protocol):
    """One open of a BinaryFile: positioned I/O served by the simulation."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> int: ...


class BinaryFile:
    """A file of raw bytes fetched from the simulation at read time, by offset.

    Guest RAM and dirty bitmaps are state only the simulation holds (and a dirty-log read
    changes it), so they are never in a snapshot: each open gets a Handle, and reads and
    writes become requests for exactly the bytes asked.  `size` gives st_size from the
    snapshot (0 for a file without a fixed size, procfs style).
    """

    def __init__(self, open_handle: Callable[[], Handle], mode: int,
                 size: Callable[[Snapshot], int] | None = None) -> None:
        self.open_handle = open_handle
        self.mode = mode
        self.size = size or (lambda snap: 0)

    @property
    def writable(self) -> bool:
        return bool(self.mode & 0o200)

    def render(self, snap: Snapshot) -> bytes:
        return b""


class _MemoryHandle:
    """vm<N>/memory: guest RAM at offset = gpa, one request per chunk.

    As /proc/<pid>/mem's mem_rw: a read or write that reaches a hole or the end of RAM after
    moving some bytes returns that count (a short read or write); the error (EIO from the
    simulation) reaches the caller only when nothing was moved.
    """

    def __init__(self, backend: Backend, vm: str) -> None:
        self.backend, self.vm = backend, vm

    def read(self, offset: int, size: int) -> bytes:
        return _read_chunks(lambda done: self.backend.request(
            "memory_read", vm=self.vm, gpa=offset + done, size=size - done).result, size)

    def write(self, offset: int, data: bytes) -> int:
        return _transfer(lambda done: self.backend.request(
            "memory_write", vm=self.vm, gpa=offset + done, data=data[done:]).result, len(data))


def _read_chunks(request: Callable[[int], bytes], size: int) -> bytes:
    """Read `size` bytes by requests, each returning some from offset `done` on (_transfer)."""
    chunks: list[bytes] = []

    def step(done: int) -> int:
        got = request(done)
        chunks.append(got)
        return len(got)

    _transfer(step, size)
    return b"".join(chunks)


def _transfer(step: Callable[[int], int], total: int) -> int:
    """Move `total` bytes by requests, each moving some from offset `done` on (its count).

    As mem_rw() does: an error once some bytes moved ends the transfer short — the bytes
    before the hole — and only an error before any is the call's error."""
    done = 0
    while done < total:
        try:
            n = step(done)
        except OSError:
            if done:
                break
            raise
        if not n:
            break
        done += n
    return done


class _DirtyLogHandle:
    """vm<N>/dirty_log/<slot>: a read at offset 0 is one KVM_GET_DIRTY_LOG; later offsets
    continue in that bitmap (as simple_attr_read fetches only at offset 0)."""

    def __init__(self, backend: Backend, vm: str, slot: int) -> None:
        self.backend, self.vm, self.slot = backend, vm, slot
        self.bitmap = b""

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0:
            self.bitmap = self.backend.request("dirty_log", vm=self.vm, slot=self.slot).result
        return self.bitmap[offset:offset + size]

    def write(self, offset: int, data: bytes) -> int:
        raise OSError(errno.EACCES, "read-only")


class _RecordingHandle:
    """vm<N>/recording: the run's recording so far, read from the simulation (which writes
    it) in chunks, so a remote user can `cp` it (docs/replay.md)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def read(self, offset: int, size: int) -> bytes:
        return _read_chunks(lambda done: self.backend.request(
            "recording_read", offset=offset + done, size=size - done).result, size)

    def write(self, offset: int, data: bytes) -> int:
        raise OSError(errno.EACCES, "read-only")


def recording_file(backend: Backend) -> BinaryFile:
    """vm<N>/recording (0444): empty without a state directory."""
    return BinaryFile(lambda: _RecordingHandle(backend), 0o444)


def memory_file(backend: Backend, vm: str) -> BinaryFile:
    """Root only (0600), as /dev/mem: the whole guest's memory.

    st_size is the end of the highest memslot, so `ls -l`, `cp` and glibc see the RAM's
    real extent (glibc's posix_fallocate fallback would otherwise write a byte per block).
    """
    def size(snap: Snapshot) -> int:
        one = snap.vm(vm)
        return one.ram_end if one else 0

    return BinaryFile(lambda: _MemoryHandle(backend, vm), 0o600, size)


def dirty_log_dir(backend: Backend, vm: str) -> Dir:
    """vm<N>/dirty_log/: one 0400 file per slot with logging on (a read harvests it)."""
    def children(snap: Snapshot) -> Mapping[str, Node]:
        one = snap.vm(vm)
        slots = one.dirty_log_slots if one else ()
        return {str(i): BinaryFile(partial(_DirtyLogHandle, backend, vm, i), 0o400) for i in slots}

    return Dir(children)


def requested_text(backend: Backend, op: str, **args: Any) -> str:
    """The text a request's reply carries ("" for none): files the simulation renders."""
    return str(backend.request(op, **args).result or "")


def requested_file(backend: Backend, op: str, args: Mapping[str, Any], mode: int = 0o444) -> File:
    """A read-only file the simulation renders when it is opened (one request per open), for
    debugging views too big or too slow to publish in every snapshot: vm<N>/mmu/pages,
    kvm/<pid>-<fd>/mmu_rmaps_stat.  A file of a VM that is gone fails to open (ENOENT)."""
    def render(snap: Snapshot) -> bytes:
        return requested_text(backend, op, **args).encode()

    return File(render, mode)


_WALK_LINE = re.compile(r"(?:0[xX])?([0-9a-fA-F]{1,16})(?: vcpu=(0|[1-9][0-9]{0,3}))?\n?")


def parse_walk(data: bytes) -> dict[str, int]:
    """vm<N>/mmu/walk: `GVA [vcpu=N]` — a hex address (`0x` optional, at most 64 bits), one
    optional vCPU number, at most one trailing newline; anything else is EINVAL."""
    m = _WALK_LINE.fullmatch(data.decode("latin-1"))
    if m is None:
        raise OSError(errno.EINVAL, "expected a hex guest virtual address [vcpu=N]")
    return {"gva": int(m[1], 16), "vcpu": int(m[2] or 0)}


class _WalkHandle:
    """One open of vm<N>/mmu/walk.  A write names the address (and vCPU) this handle walks;
    a read at offset 0 renders the walk afresh, later offsets continue in that text.  A
    handle that never wrote walks the address last written to the file through any handle
    (so `echo ADDR > walk; cat walk` works); two handles that wrote read their own."""

    def __init__(self, backend: Backend, vm: str, last: dict[str, dict[str, int]]) -> None:
        self.backend, self.vm, self.last = backend, vm, last
        self.args: dict[str, int] | None = None
        self.text = b""

    def _render(self, args: dict[str, int]) -> bytes:
        return requested_text(self.backend, "mmu_walk", vm=self.vm, **args).encode()

    def write(self, offset: int, data: bytes) -> int:
        args = parse_walk(data)
        self.text = self._render(args)  # a bad vCPU fails the write (EINVAL)
        self.args = self.last["args"] = args
        return len(data)

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0:
            args = self.args or self.last.get("args")
            self.text = self._render(args) if args is not None else b""
        return self.text[offset:offset + size]


def walk_file(backend: Backend, vm: str) -> BinaryFile:
    """vm<N>/mmu/walk (0644): write `GVA [vcpu=N]`, read the guest and shadow walks of it."""
    last: dict[str, dict[str, int]] = {}
    return BinaryFile(lambda: _WalkHandle(backend, vm, last), 0o644)


def action_file(backend: Backend, op: str, parse: Parse) -> RequestFile:
    """A write-only trigger (0200), e.g. `echo 1 > vm0/zap_all`."""
    return RequestFile(backend, lambda snap: b"", op, parse, mode=0o200)


def log_file(name: str) -> File:
    """A ring of lines the simulation publishes under `name` (kvm/audit_log, kvm/fault_log)."""
    return File(lambda snap: "".join(f"{line}\n" for line in snap.logs.get(name, ())).encode())


def isolation_dir(backend: Backend) -> Dir:
    """kvm/isolation/: `map` (0200) extends the KVM address space, `mappings` (0444) lists it,
    `faults` (0444) is mmud's table of the logged faults (not a kernel file; docs/isolation.md),
    `history` (0444) the same rows of earlier runs and of this one, read back from the state
    directory (mmud only).

    `map` is write-only, as debugfs makes a file without a read method: what it did is read
    back from `mappings`.  Syntax is checked here; whether a symbol exists, by the simulation.
    """
    def parse(data: bytes) -> dict[str, Any]:
        parse_map(data)
        return {"text": data}

    return Dir({"map": action_file(backend, "isolation_map", parse),
                "mappings": log_file("isolation/mappings"),
                "faults": log_file("isolation/faults"),
                "history": log_file("isolation/history")})


def _refuse(e: ParamError) -> OSError:
    return OSError(e.errno, str(e))


def param_file(backend: Backend, params: Params, name: str, render: Render | None = None) -> File:
    """parameters/<name>: the module parameter's sysfs file (a 0444 one has no store)."""
    render = render or (lambda snap: snap.params[name])
    if not params.mode(name) & 0o200:
        return File(render, params.mode(name))

    def parse(data: bytes) -> dict[str, Any]:
        try:
            params.parse(name, data)  # validate here; the simulation applies the same parse
        except ParamError as e:
            raise _refuse(e) from None
        return {"name": name, "text": data}

    return RequestFile(backend, render, "param", parse, params.mode(name))


def mmu_debug_file(backend: Backend, params: Params) -> File:
    """kvm/mmu-debug: the debugfs face of the mmu_audit switch, read as "1\\n"/"0\\n".

    It writes through the mmu_audit setter, so it takes exactly 0 or 1 and refuses anything
    else with EINVAL, and a write to either file shows in both.
    """
    return param_file(backend, params, "mmu_audit",
                      render=lambda snap: b"1\n" if snap.params["mmu_audit"] == b"Y\n" else b"0\n")


def _stat_sum(vms: tuple[VmSnapshot, ...], name: str) -> bytes:
    return b"%d\n" % sum(v.stats.get(name, 0) for v in vms)


def _parse_clear(data: bytes) -> None:
    """simple_attr_write() then the KVM stat setter: only a 0 (`0`, `0\\n`, `00`, `0x0`) clears."""
    try:
        value = kstrtoull(data[:SIMPLE_ATTR_MAX].decode("latin-1").split("\0", 1)[0], 0)
    except ParamError as e:
        raise _refuse(e) from None
    if value != 0:
        raise OSError(errno.EINVAL, "a statistic can only be cleared to 0")


def stat_file(backend: Backend, desc: StatDesc, vm: str | None = None) -> File:
    """kvm/<stat> (sum over all VMs) or kvm/<pid>-<fd>/<stat> (the VM named `vm`).

    Instant stats (gauges) are 0444 without a setter; the others clear on a write of 0.
    """
    if vm is None:
        def render(snap: Snapshot) -> bytes:
            return _stat_sum(snap.vms, desc.name)
    else:
        def render(snap: Snapshot) -> bytes:
            one = snap.vm(vm)
            return _stat_sum((one,) if one else (), desc.name)
    if desc.mode == 0o444:
        return File(render)

    def parse(data: bytes) -> dict[str, Any]:
        _parse_clear(data)
        return {"name": desc.name, "vm": vm}

    return RequestFile(backend, render, "clear_stat", parse, desc.mode)


def choice_file(backend: Backend, render: Render, op: str, key: str,
                choices: tuple[str, ...], extra: Mapping[str, Any]) -> RequestFile:
    """A file that takes one word of `choices`, with at most one trailing newline."""
    def parse(data: bytes) -> dict[str, Any]:
        word = data[:-1] if data.endswith(b"\n") else data
        text = word.decode("latin-1")
        if text not in choices:
            raise OSError(errno.EINVAL, f"expected one of {', '.join(choices)}")
        return {**extra, key: text}

    return RequestFile(backend, render, op, parse)


Command = Callable[[bytes], tuple[str, dict[str, Any]]]  # write(2) bytes -> (op, args)


class CommandFile(File):
    """A writable file whose line names the request: `create …` and `destroy …` of `vms`.

    Like a RequestFile, each write(2) is parsed whole here (OSError to refuse, nothing sent)
    and becomes exactly one request; the parser picks its op.
    """

    def __init__(self, backend: Backend, render: Render, parse: Command,
                 mode: int = 0o644) -> None:
        super().__init__(render, mode)
        self.backend, self.parse = backend, parse

    @property
    def writable(self) -> bool:
        return True

    def store(self, data: bytes) -> None:
        op, args = self.parse(data)
        self.backend.request(op, **args)


class LiveFile(File):
    """A file the simulation renders at each open and applies each write(2) of (one request
    each), with an O_TRUNC open that is a request too: the tracing/ files.  `args` name the
    file in the request; `parse` (mmud/uapi) checks a write first (None: read-only).  Reads
    go to `<op>_read`, which changes nothing a snapshot shows, so no snapshot follows it."""

    def __init__(self, backend: Backend, op: str, args: Mapping[str, Any], parse: Parse | None,
                 mode: int = 0o644) -> None:
        super().__init__(self._render, mode)
        self.backend, self.op, self.args, self.parse = backend, op, dict(args), parse

    def _render(self, snap: Snapshot) -> bytes:
        return requested_text(self.backend, f"{self.op}_read", action="read", **self.args).encode()

    @property
    def writable(self) -> bool:
        return self.parse is not None

    def store(self, data: bytes) -> None:
        if self.parse is None:
            raise OSError(errno.EACCES, "no store method")
        self.backend.request(self.op, action="write", **self.args, **self.parse(data))

    def truncate(self) -> None:
        self.backend.request(self.op, action="truncate", **self.args)


class _PipeHandle:
    """One open of a consuming pipe (trace_pipe): each read takes lines off the one stream
    every reader shares; an empty pipe is EAGAIN. A blocking open (`blocks`) waits in the
    FUSE adapter, which asks again until there is a line or the reader is interrupted."""

    def __init__(self, backend: Backend, op: str, nonblock: bool) -> None:
        self.backend, self.op, self.blocks = backend, op, not nonblock

    def read(self, offset: int, size: int) -> bytes:
        got = requested_text(self.backend, f"{self.op}_read", action="pipe", size=size)
        if not got:
            raise OSError(errno.EAGAIN, "trace_pipe is empty")
        return got.encode()

    def write(self, offset: int, data: bytes) -> int:
        raise OSError(errno.EACCES, "read-only")


class PipeFile(BinaryFile):
    """A read-only consuming pipe (0444): opened with the open(2) flags (O_NONBLOCK)."""

    def __init__(self, backend: Backend, op: str) -> None:
        super().__init__(lambda: _PipeHandle(backend, op, False), 0o444)
        self.backend, self.op = backend, op

    def open_flags(self, flags: int) -> Handle:
        return _PipeHandle(self.backend, self.op, bool(flags & os.O_NONBLOCK))


Node = Dir | File | BinaryFile
