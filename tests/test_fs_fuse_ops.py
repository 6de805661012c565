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
import structlog.testing

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
    assert fs.readdir("/", 0) == [".", "..", "parameters", "kvm", "vms", "tracing", "vm0"]
    assert fs.readdir("/vm0/dirty_log", 0) == [".", "..", "0"]


def test_readdir_follows_the_latest_snapshot(fs, backend):
    backend.snapshot = snapshot(vm_snapshot("vm0", VM0_DIR), vm_snapshot("vm1", "4242-9"))
    assert fs.readdir("/", 0)[-2:] == ["vm0", "vm1"]
    assert S_ISDIR(fs.getattr("/kvm/4242-9")["st_mode"])
    backend.snapshot = snapshot()
    assert fs.readdir("/", 0) == [".", "..", "parameters", "kvm", "vms", "tracing"]
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


# -- sizes, fallocate, names, attributes, oversized writes, the last-resort guard ---------------


def test_memory_reports_the_end_of_guest_ram_as_its_size(backend):
    backend.snapshot = snapshot(vm_snapshot("vm0", VM0_DIR, ram_end=64 << 20,
                                            dirty_log_slots=(0,)))
    fs = ControlFS(Tree(backend, Params()), backend, ready=lambda: None)
    st = fs.getattr("/vm0/memory")
    assert st["st_size"] == 64 << 20 and st["st_blocks"] == (64 << 20) // 512
    assert fs.getattr("/vm0/dirty_log/0")["st_size"] == 0  # a bitmap has no fixed size


def test_memory_of_a_vm_without_ram_end_reports_size_0(fs):
    assert fs.getattr("/vm0/memory")["st_size"] == 0


@pytest.mark.parametrize("path", ["/vm0/memory", "/parameters/mmu_audit", "/kvm/exits"])
def test_fallocate_fails_with_enodev_which_glibc_does_not_fall_back_on(fs, backend, path):
    info = opened(fs, path, os.O_RDWR)
    assert errno_of(fs.fallocate, path, 0, 0, 4096, info) == errno.ENODEV
    assert backend.requests == []


@pytest.mark.parametrize(("call", "args", "err"), [
    ("create", ("/vm0/new", 0o644, None), errno.EACCES),
    ("mknod", ("/vm0/new", 0o644, 0), errno.EPERM),
    ("mkdir", ("/kvm/new", 0o755), errno.EPERM),
    ("rmdir", ("/vm0/dirty_log",), errno.EPERM),
    ("unlink", ("/vm0/state",), errno.EPERM),
    ("rename", ("/vm0/state", "/vm0/state2"), errno.EPERM),
    ("symlink", ("/vm0/link", "state"), errno.EPERM),
    ("link", ("/vm0/link", "/vm0/state"), errno.EPERM),
])
def test_names_are_never_created_removed_renamed_or_linked(fs, call, args, err):
    assert errno_of(getattr(fs, call), *args) == err
    assert fs.readdir("/vm0", 0).count("state") == 1


def test_chmod_chown_and_utimens_show_in_getattr(fs):
    assert fs.chmod("/vm0/state", S_IFREG | 0o600) == 0
    assert fs.chown("/vm0/state", 1000, -1) == 0
    assert fs.utimens("/vm0/state", (1_000_000_000, 2_000_000_000)) == 0
    st = fs.getattr("/vm0/state")
    assert st["st_mode"] == S_IFREG | 0o600 and (st["st_uid"], st["st_gid"]) == (1000, 0)
    assert (st["st_atime"], st["st_mtime"]) == (1_000_000_000, 2_000_000_000)
    assert st["st_ctime"] > fs.mtime_ns
    assert fs.getattr("/vm0/inject")["st_mode"] == S_IFREG | 0o644  # per path
    assert fs.chmod("/kvm", S_IFDIR | 0o700) == 0
    assert fs.getattr("/kvm")["st_mode"] == S_IFDIR | 0o700


def test_utimens_now_and_omit(fs):
    fs.utimens("/vm0/state", (5, 6))
    fs.utimens("/vm0/state", ((1 << 30) - 2, (1 << 30) - 1))  # UTIME_OMIT, UTIME_NOW
    st = fs.getattr("/vm0/state")
    assert st["st_atime"] == 5 and st["st_mtime"] > fs.mtime_ns
    fs.utimens("/vm0/state", None)
    assert fs.getattr("/vm0/state")["st_atime"] > fs.mtime_ns


def test_attributes_of_a_missing_path_are_enoent(fs):
    assert errno_of(fs.chmod, "/vm0/nope", 0o644) == errno.ENOENT
    assert errno_of(fs.chown, "/vm1/state", 0, 0) == errno.ENOENT


def test_a_read_only_parameter_chmod_writable_opens_and_its_write_fails_with_eio(fs, backend):
    """sysfs: the open looks at the mode (kernfs_fop_open), the write at the store, which a
    0444 parameter never gets (add_sysfs_param): module_attr_store answers EIO."""
    path = "/parameters/mmio_caching"
    fs.chmod(path, S_IFREG | 0o644)
    assert S_IMODE(fs.getattr(path)["st_mode"]) == 0o644
    info = opened(fs, path, os.O_WRONLY | os.O_TRUNC)
    assert fs.truncate(path, 0, info) == 0
    assert errno_of(fs.write, path, b"0\n", 0, info) == errno.EIO
    assert backend.requests == []


@pytest.mark.parametrize("path", ["/vm0/status", "/kvm/pages_4k", "/vm0/dirty_log/0"])
def test_chmod_never_makes_a_file_without_a_store_writable(fs, backend, path):
    fs.chmod(path, S_IFREG | 0o666)
    assert errno_of(fs.open, path, fi(os.O_WRONLY)) == errno.EACCES
    assert errno_of(fs.truncate, path, 0) == errno.EACCES
    assert backend.requests == []


def test_a_sysfs_file_chmod_read_only_refuses_root_a_write_open(fs):
    """KERNFS_ROOT_EXTRA_OPEN_PERM_CHECK: no write bit, no write open, root included."""
    fs.chmod("/parameters/mmu_audit", S_IFREG | 0o444)
    assert errno_of(fs.open, "/parameters/mmu_audit", fi(os.O_WRONLY)) == errno.EACCES
    assert opened(fs, "/parameters/mmu_audit").direct_io == 1
    fs.chmod("/parameters/mmu_audit", S_IFREG | 0o200)
    assert errno_of(fs.open, "/parameters/mmu_audit", fi(os.O_RDONLY)) == errno.EACCES


def test_debugfs_files_keep_their_methods_whatever_the_mode(fs):
    """debugfs checks only the ordinary permissions, which root passes."""
    fs.chmod("/kvm/exits", S_IFREG | 0o000)
    assert opened(fs, "/kvm/exits", os.O_RDWR).direct_io == 1


def test_a_sysfs_write_stores_at_most_one_page_and_returns_that_count(fs, backend):
    info = opened(fs, "/parameters/mmu_audit_ratelimit_ms", os.O_WRONLY)
    data = b"7\n" + b"\0" * 4998
    assert fs.write("/parameters/mmu_audit_ratelimit_ms", data, 0, info) == 4096
    assert backend.requests == [("param", {"name": "mmu_audit_ratelimit_ms", "text": data[:4096]})]


def test_a_debugfs_write_is_taken_whole(fs, backend):
    info = opened(fs, "/kvm/exits", os.O_WRONLY)
    assert fs.write("/kvm/exits", b"0\n" + b"\0" * 8190, 0, info) == 8192
    assert backend.requests == [("clear_stat", {"name": "exits", "vm": None})]


def test_an_unexpected_exception_answers_eio_and_logs_one_line_without_a_traceback(fs, backend):
    def broken(**args: object) -> None:
        raise ValueError("a parser bug")

    backend.results["memory_read"] = broken
    info = opened(fs, "/vm0/memory")
    with structlog.testing.capture_logs() as events:
        assert errno_of(fs.read, "/vm0/memory", 16, 0, info) == errno.EIO
    assert events == [{"event": "fs_callback_error", "log_level": "error", "op": "read",
                       "path": "/vm0/memory", "error": "ValueError", "message": "a parser bug"}]


def test_oserror_passes_the_guard_untouched(fs):
    with structlog.testing.capture_logs() as events:
        assert errno_of(fs.getattr, "/nope") == errno.ENOENT
    assert events == []


def test_the_attributes_of_a_vms_files_go_with_the_vm(fs, backend):
    fs.chmod("/vm0/state", S_IFREG | 0o600)
    fs.chmod(f"/kvm/{VM0_DIR}/exits", S_IFREG | 0o600)
    fs.chmod("/parameters/mmu_audit", S_IFREG | 0o600)
    backend.snapshot = snapshot()  # vm0 destroyed ...
    assert errno_of(fs.getattr, "/vm0/state") == errno.ENOENT
    backend.snapshot = snapshot(vm_snapshot("vm0", "4242-11"))  # ... and created again
    assert S_IMODE(fs.getattr("/vm0/state")["st_mode"]) == 0o644
    assert S_IMODE(fs.getattr("/parameters/mmu_audit")["st_mode"]) == 0o600
