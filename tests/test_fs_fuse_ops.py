"""The FUSE adapter (mmud/fs/fuse.py ControlFS) called directly, without a mount.

It checks what the adapter decides by itself: attributes, directory listings, which opens it
refuses, that an open renders the file once, and how write(2) maps to a store.  The kernel's
side of the same behaviour (a shell's echo/cat/dd, errno reaching write(2), O_TRUNC) is tested
through a real mount in the other tests/test_fs_*.py files.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from stat import S_IFDIR, S_IFREG, S_IMODE, S_ISDIR, S_ISREG
from types import SimpleNamespace

import pytest

from mmud.fs.fuse import ControlFS
from mmud.fs.tree import Tree
from mmud.uapi.params import Params
from tests.fakebackend import FakeBackend, snapshot, vm_snapshot

VM0_DIR = "4242-7"


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(snapshot(vm_snapshot("vm0", VM0_DIR, dirty_log_slots=(0,))))


@pytest.fixture
def fs(backend: FakeBackend) -> ControlFS:
    return ControlFS(Tree(backend, Params()), backend, ready=lambda: None)


def fi(flags: int) -> SimpleNamespace:
    """The fuse_file_info fields ControlFS uses."""
    return SimpleNamespace(flags=flags, fh=0, direct_io=0)


def opened(fs: ControlFS, path: str, flags: int = os.O_RDONLY) -> SimpleNamespace:
    info = fi(flags)
    assert fs.open(path, info) == 0
    return info


def errno_of(call: Callable[..., object], *args: object) -> int | None:
    with pytest.raises(OSError) as e:
        call(*args)
    return e.value.errno


def test_init_reports_ready():
    calls = []
    backend = FakeBackend(snapshot())
    ControlFS(Tree(backend, Params()), backend, ready=lambda: calls.append(1)).init("/")
    assert calls == [1]


# -- attributes and listings ------------------------------------------------------------------


@pytest.mark.parametrize(("path", "kind", "mode"), [
    ("/", S_IFDIR, 0o755), ("/kvm", S_IFDIR, 0o755), ("/vm0/dirty_log", S_IFDIR, 0o755),
    ("/parameters/mmu_audit", S_IFREG, 0o644), ("/parameters/mmio_caching", S_IFREG, 0o444),
    ("/kvm/pages_4k", S_IFREG, 0o444), ("/kvm/exits", S_IFREG, 0o644),
    ("/kvm/isolation/map", S_IFREG, 0o200), ("/vm0/memory", S_IFREG, 0o600),
    ("/vm0/dirty_log/0", S_IFREG, 0o400),
])
def test_getattr_gives_the_kind_and_mode_owned_by_root(fs, path, kind, mode):
    st = fs.getattr(path)
    assert (st["st_mode"] & ~0o7777, S_IMODE(st["st_mode"])) == (kind, mode)
    assert (st["st_uid"], st["st_gid"]) == (0, 0)
    assert st["st_nlink"] == (2 if kind == S_IFDIR else 1)


def test_getattr_reports_size_0_as_procfs_does(fs):
    assert all(fs.getattr(p)["st_size"] == 0 for p in ("/kvm/exits", "/vm0/status", "/vm0/memory"))


def test_every_file_keeps_the_time_the_mount_appeared(fs):
    times = {fs.getattr(p)[k] for p in ("/", "/kvm/exits", "/vm0/state")
             for k in ("st_atime", "st_mtime", "st_ctime")}
    assert times == {fs.mtime_ns}


def test_getattr_of_a_missing_path_is_enoent(fs):
    assert errno_of(fs.getattr, "/vm1") == errno.ENOENT


def test_readdir_lists_dot_dotdot_then_the_children(fs):
    assert fs.readdir("/", 0) == [".", "..", "parameters", "kvm", "vm0"]
    assert fs.readdir("/vm0/dirty_log", 0) == [".", "..", "0"]


def test_readdir_follows_the_latest_snapshot(fs, backend):
    backend.snapshot = snapshot(vm_snapshot("vm0", VM0_DIR), vm_snapshot("vm1", "4242-9"))
    assert fs.readdir("/", 0)[-2:] == ["vm0", "vm1"]
    assert S_ISDIR(fs.getattr("/kvm/4242-9")["st_mode"])
    backend.snapshot = snapshot()
    assert fs.readdir("/", 0) == [".", "..", "parameters", "kvm"]
    assert errno_of(fs.getattr, "/vm0/state") == errno.ENOENT


def test_readdir_of_a_file_is_enotdir(fs):
    assert errno_of(fs.readdir, "/kvm/exits", 0) == errno.ENOTDIR


# -- open ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR])
@pytest.mark.parametrize("path", ["/parameters/page_fault_stack", "/kvm/pages_4k", "/vm0/status",
                                  "/kvm/fault_log", "/vm0/dirty_log/0"])
def test_a_write_open_of_a_read_only_file_fails_with_eacces(fs, path, flags):
    assert errno_of(fs.open, path, fi(flags)) == errno.EACCES
    assert errno_of(fs.truncate, path, 0) == errno.EACCES


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_RDWR])
def test_a_read_open_of_a_write_only_file_fails_with_eacces(fs, flags):
    assert errno_of(fs.open, "/kvm/isolation/map", fi(flags)) == errno.EACCES
    assert fs.open("/kvm/isolation/map", fi(os.O_WRONLY)) == 0


@pytest.mark.parametrize("path", ["/kvm/exits", "/parameters/mmu_audit", "/vm0/memslots"])
def test_a_writable_file_opens_for_writing_and_truncates(fs, path):
    assert fs.open(path, fi(os.O_WRONLY | os.O_TRUNC)) == 0
    assert fs.truncate(path, 0) == 0


def test_an_open_of_a_directory_is_eisdir(fs):
    assert errno_of(fs.open, "/kvm", fi(os.O_RDONLY)) == errno.EISDIR


def test_an_open_of_a_missing_file_is_enoent(fs):
    assert errno_of(fs.open, "/vm0/nope", fi(os.O_RDONLY)) == errno.ENOENT


def test_every_open_gets_direct_io_and_its_own_handle(fs):
    handles = [opened(fs, p) for p in ("/kvm/exits", "/kvm/exits", "/vm0/memory")]
    assert all(h.direct_io == 1 for h in handles)
    assert len({h.fh for h in handles}) == 3


# -- read ------------------------------------------------------------------------------------


def test_an_open_renders_the_file_once_and_reads_follow_offsets(fs, backend):
    info = opened(fs, "/parameters/mmu_audit_ratelimit_ms")
    backend.snapshot = snapshot(params=Params({"mmu_audit_ratelimit_ms": "7"}))
    assert fs.read("/parameters/mmu_audit_ratelimit_ms", 2, 0, info) == b"50"
    assert fs.read("/parameters/mmu_audit_ratelimit_ms", 100, 2, info) == b"00\n"
    assert fs.read("/parameters/mmu_audit_ratelimit_ms", 100, 5, info) == b""
    later = opened(fs, "/parameters/mmu_audit_ratelimit_ms")
    assert fs.read("/parameters/mmu_audit_ratelimit_ms", 100, 0, later) == b"7\n"


def test_release_forgets_the_rendering(fs):
    info = opened(fs, "/vm0/state")
    assert fs.read("/vm0/state", 100, 0, info) == b"running\n"
    assert fs.release("/vm0/state", info) == 0
    assert fs.read("/vm0/state", 100, 0, info) == b""


# -- write -----------------------------------------------------------------------------------


def test_a_write_is_one_store_of_the_whole_buffer_whatever_its_offset(fs, backend):
    info = opened(fs, "/parameters/mmu_audit_ratelimit_ms", os.O_WRONLY)
    assert fs.write("/parameters/mmu_audit_ratelimit_ms", b"7\n", 3, info) == 2
    assert backend.requests == [("param", {"name": "mmu_audit_ratelimit_ms", "text": b"7\n"})]


def test_a_zero_length_write_returns_0_and_stores_nothing(fs, backend):
    info = opened(fs, "/parameters/mmu_audit", os.O_WRONLY)
    assert fs.write("/parameters/mmu_audit", b"", 0, info) == 0
    assert backend.requests == []


@pytest.mark.parametrize(("path", "data", "err"), [
    ("/parameters/mmu_audit", b"y", errno.EINVAL),
    ("/parameters/mmu_audit_ratelimit_burst", b"4294967296", errno.ERANGE),
    ("/vm0/zap_all", b"all", errno.EINVAL),
])
def test_a_refused_write_fails_with_its_errno_and_sends_nothing(fs, backend, path, data, err):
    info = opened(fs, path, os.O_WRONLY)
    assert errno_of(fs.write, path, data, 0, info) == err
    assert backend.requests == []


def test_a_write_fails_with_the_simulations_errno(fs, backend):
    backend.errors["memslot"] = errno.EEXIST
    info = opened(fs, "/vm0/memslots", os.O_WRONLY)
    assert errno_of(fs.write, "/vm0/memslots", b"add 0 0x100000000 0x1000\n", 0, info) == errno.EEXIST
    assert len(backend.requests) == 1


def test_memory_io_goes_through_the_handle_at_the_file_offset(fs, backend):
    backend.results["memory_read"] = lambda vm, gpa, size: bytes(min(size, 16))
    backend.results["memory_write"] = lambda vm, gpa, data: len(data)
    info = opened(fs, "/vm0/memory", os.O_RDWR)
    assert fs.write("/vm0/memory", b"abc", 0x1000, info) == 3
    assert fs.read("/vm0/memory", 16, 0x2000, info) == bytes(16)
    assert backend.requests == [("memory_write", {"vm": "vm0", "gpa": 0x1000, "data": b"abc"}),
                                ("memory_read", {"vm": "vm0", "gpa": 0x2000, "size": 16})]


def test_a_dirty_log_read_through_the_adapter_harvests_once_per_read_at_0(fs, backend):
    backend.results["dirty_log"] = lambda vm, slot: b"\xff\x00"
    info = opened(fs, "/vm0/dirty_log/0")
    assert fs.read("/vm0/dirty_log/0", 1, 0, info) == b"\xff"
    assert fs.read("/vm0/dirty_log/0", 1, 1, info) == b"\x00"
    assert backend.requests == [("dirty_log", {"vm": "vm0", "slot": 0})]


def test_a_byte_file_is_a_regular_file(fs):
    assert S_ISREG(fs.getattr("/vm0/memory")["st_mode"])


def test_a_byte_file_is_written_only_through_the_handle_its_open_made(fs, backend):
    info = opened(fs, "/vm0/memory", os.O_RDWR)
    fs.release("/vm0/memory", info)
    assert errno_of(fs.write, "/vm0/memory", b"abc", 0, info) == errno.EBADF
    assert backend.requests == []
