"""The one adapter to the FUSE binding (mfusepy, with the fusepy API).

Kernel semantics it adds on top of the node types (docs/control-files.md §11):
- every open gets direct I/O and a private rendering of the file, taken at open, so `cat`
  sees the whole current content whatever size was last reported (st_size is 0, procfs
  style, but for vm<N>/memory);
- a write open or truncate of a file without a store fails with EACCES even for root, which
  `default_permissions` alone would let through;
- each write(2) is one complete store, its offset ignored as sysfs ignores it; a zero-length
  write returns 0 without a store; a sysfs-like file stores at most one page per write(2)
  and returns that count (kernfs_fop_write_iter), a debugfs file (kvm/) takes it whole;
- fallocate fails with ENODEV, as it does on /dev/mem, so glibc's posix_fallocate does not
  fall back to writing bytes; vm<N>/memory reports the end of guest RAM as st_size;
- nothing creates, removes, renames or links names (EACCES for a create, EPERM for the
  others, as sysfs and debugfs answer); chmod, chown and utimens are kept per path in this
  process (lost at a restart, as kernfs keeps them in memory) and never make a file without a
  store writable;
- callbacks only read the latest snapshot or send a request; they do no file I/O (not even
  logging: the simulation logs each store it applies, with its step) and never touch the
  mount point.  The exceptions are the `mounted` event at init() and `fs_callback_error`,
  the last-resort guard's one line for a callback that raised something other than OSError
  (it answers EIO; no traceback reaches the log).
"""

from __future__ import annotations

import errno
import functools
import itertools
import ctypes
import os
import time
from collections.abc import Callable
from pathlib import Path
from stat import S_IFDIR, S_IFREG
from typing import Any, TypeVar

import mfusepy
import structlog
from mfusepy import FUSE, Operations

from mmud.daemon.protocol import Snapshot
from mmud.fs.nodes import Backend, BinaryFile, Dir, File, Handle, LiveFile, Node, PipeFile
from mmud.fs.tree import Tree

log = structlog.get_logger("mmud.fs")

# kernfs_fop_write_iter() hands a sysfs store at most PAGE_SIZE bytes of one write(2) (the
# files have no atomic_write_len) and returns what the store returns: that count.
PAGE_SIZE = 4096
DEBUGFS = "/kvm"  # kvm/ mirrors /sys/kernel/debug/kvm; everything else is kernfs (sysfs) style
PARAMETERS = "/parameters/"  # module parameters: module_sysfs_ops has a store for every one
# utimensat's special nanosecond values, as libfuse 2 passes them on (tv_sec 0).
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
_MESSAGE_MAX = 200  # fs_callback_error keeps this much of an exception's message
# How often a blocked trace_pipe read asks the simulation for lines again.
PIPE_POLL_SECONDS = 0.005
# libfuse's fuse_interrupted(): true in the thread serving a request whose caller was
# interrupted (a signal, a kill) — with the `intr` mount option, libfuse signals that thread
# when the kernel sends FUSE_INTERRUPT. mfusepy loads libfuse but does not wrap this call.
_fuse_interrupted = mfusepy._libfuse.fuse_interrupted
_fuse_interrupted.restype = ctypes.c_int
_fuse_interrupted.argtypes = []

F = TypeVar("F", bound=Callable[..., Any])


def _guarded(fn: F) -> F:
    """The last-resort guard: an exception other than OSError answers EIO and logs one
    `fs_callback_error` line (type and message, no traceback) instead of mfusepy's EINVAL
    with a traceback.  The parsers are meant never to get here (they refuse with OSError)."""
    @functools.wraps(fn)
    def call(self: ControlFS, path: str | None, *args: Any) -> Any:
        try:
            return fn(self, path, *args)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - the one place that turns any bug into EIO
            log.error("fs_callback_error", op=fn.__name__, path=path, error=type(e).__name__,
                      message=str(e)[:_MESSAGE_MAX])
            raise OSError(errno.EIO, f"{fn.__name__} {path}") from None
    return call  # type: ignore[return-value]


def _debugfs(path: str) -> bool:
    return path == DEBUGFS or path.startswith(DEBUGFS + "/")


class ControlFS(Operations):
    use_ns = True

    def __init__(self, tree: Tree, backend: Backend, ready: Callable[[], None]) -> None:
        self.tree, self.backend, self.ready = tree, backend, ready
        self.snaps: dict[int, bytes] = {}
        self.handles: dict[int, Handle] = {}  # opens of BinaryFiles: I/O by offset
        self.ids = itertools.count(1)
        self.mtime_ns = time.time_ns()  # like sysfs: the time the file appeared
        # chmod/chown/utimens by path: st_mode permission bits, st_uid, st_gid, times.
        # Kept here only, as kernfs keeps them in its nodes: a restart forgets them, and so
        # does a VM's going (its files go with it; `_scope` names the directory they go with).
        self.attrs: dict[str, dict[str, int]] = {}
        self.scopes: dict[str, str] = {}  # path -> its VM directory, for paths inside one

    def _snap(self) -> Snapshot:
        snap = self.backend.snapshot
        assert snap is not None  # the daemon mounts only after the first snapshot
        if self.scopes:
            self._forget_gone(snap)
        return snap

    @staticmethod
    def _vm_dirs(snap: Snapshot) -> set[str]:
        return {f"/{v.name}" for v in snap.vms} | {f"{DEBUGFS}/{v.debugfs_dir}" for v in snap.vms}

    def _scope(self, path: str, snap: Snapshot) -> str | None:
        """The per-VM directory `path` lies in (vm<N>/ or kvm/<pid>-<fd>/), if any."""
        return next((d for d in self._vm_dirs(snap) if path == d or path.startswith(d + "/")),
                    None)

    def _forget_gone(self, snap: Snapshot) -> None:
        """Drop the attributes of files whose VM is gone: a VM created again under the same
        name starts with the modes and times of new files."""
        live = self._vm_dirs(snap)
        for path, scope in list(self.scopes.items()):
            if scope not in live:
                self.scopes.pop(path, None)
                self.attrs.pop(path, None)

    def _file(self, path: str) -> File | BinaryFile:
        node = self.tree.lookup(path, self._snap())
        if isinstance(node, Dir):
            raise OSError(errno.EISDIR, path)
        return node

    def _mode(self, path: str, node: Node) -> int:
        """The permission bits `ls -l` shows: the node's, or what chmod set."""
        return self.attrs.get(path, {}).get("mode", node.mode)

    def _can_store(self, path: str, node: File | BinaryFile) -> bool:
        """Whether a write open (or a truncate) of `path` succeeds, even for root.

        sysfs (KERNFS_ROOT_EXTRA_OPEN_PERM_CHECK in kernfs_fop_open): the current mode needs
        a write bit and the file a write method.  Every parameter file has one (module
        sysfs_ops), so a read-only parameter chmod'ed writable opens, and its write fails
        with EIO (module_attr_store without the attribute's store).  debugfs checks only the
        ordinary permissions, which root passes; mmud refuses a file without a setter at the
        open instead of at the write (docs/control-files.md §9).
        """
        if _debugfs(path):
            return node.writable
        has_write = node.writable or path.startswith(PARAMETERS)
        return has_write and bool(self._mode(path, node) & 0o222)

    def _can_show(self, path: str, node: File | BinaryFile) -> bool:
        """Whether a read open succeeds: a show method (read bits at creation), and in sysfs
        read bits in the current mode too."""
        if not node.mode & 0o444:
            return False  # a write-only file has no show method
        return _debugfs(path) or bool(self._mode(path, node) & 0o444)

    def init(self, path: str) -> None:
        self.ready()  # the mount is in /proc/self/mounts by now

    @_guarded
    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        snap = self._snap()
        node = self.tree.lookup(path, snap)
        kind, nlink = (S_IFDIR, 2) if isinstance(node, Dir) else (S_IFREG, 1)
        size = node.size(snap) if isinstance(node, BinaryFile) else 0
        t = self.mtime_ns
        st = {"st_mode": kind | node.mode, "st_nlink": nlink, "st_size": size,
              "st_blocks": -(-size // 512), "st_uid": 0, "st_gid": 0,
              "st_atime": t, "st_mtime": t, "st_ctime": t}
        if (changed := self.attrs.get(path)) is not None:
            st.update({k: v for k, v in changed.items() if k != "mode"})
            st["st_mode"] = kind | changed.get("mode", node.mode)
        return st

    @_guarded
    def readdir(self, path: str, fh: Any) -> list[str]:
        node = self.tree.lookup(path, self._snap())
        if not isinstance(node, Dir):
            raise OSError(errno.ENOTDIR, path)
        return [".", "..", *node.children(self._snap())]  # names only, never offsets

    @_guarded
    def open(self, path: str, fi: Any) -> int:
        access = fi.flags & os.O_ACCMODE
        node = self._file(path)
        if access != os.O_RDONLY and not self._can_store(path, node):
            raise OSError(errno.EACCES, path)
        if access != os.O_WRONLY and not self._can_show(path, node):
            raise OSError(errno.EACCES, path)
        fi.direct_io, fi.fh = 1, next(self.ids)
        if isinstance(node, PipeFile):  # trace_pipe: blocking unless O_NONBLOCK
            self.handles[fi.fh] = node.open_flags(fi.flags)
            return 0
        if isinstance(node, BinaryFile):
            self.handles[fi.fh] = node.open_handle()
            return 0
        readable = node.mode & 0o444 and access != os.O_WRONLY
        self.snaps[fi.fh] = node.render(self._snap()) if readable else b""
        return 0  # with raw_fi this is a status, not the handle

    @_guarded
    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        if (handle := self.handles.get(fi.fh)) is not None:
            return self._read_handle(handle, offset, size)
        return self.snaps.get(fi.fh, b"")[offset:offset + size]

    @staticmethod
    def _read_handle(handle: Handle, offset: int, size: int) -> bytes:
        """A handle's read; a blocking pipe waits for data as the kernel's wait_event does,
        and gives up with EINTR when its reader is interrupted or killed — so a dead reader
        does not go on consuming lines that a new reader should get."""
        while True:
            try:
                return handle.read(offset, size)
            except BlockingIOError:
                if not getattr(handle, "blocks", False):
                    raise
            if _fuse_interrupted():
                raise OSError(errno.EINTR, "interrupted")
            time.sleep(PIPE_POLL_SECONDS)

    @_guarded
    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        if not data:
            return 0  # sysfs never hands an empty buffer to a setter
        if (handle := self.handles.get(fi.fh)) is not None:
            return handle.write(offset, bytes(data))  # a byte file: positioned, short writes
        node = self._file(path)
        if isinstance(node, BinaryFile):
            raise OSError(errno.EBADF, path)  # written only through the handle its open made
        if not node.writable:  # opened only by way of a chmod: a parameter without a store
            raise OSError(errno.EIO if path.startswith(PARAMETERS) else errno.EACCES, path)
        if not _debugfs(path):
            data = data[:PAGE_SIZE]  # kernfs: one page per write(2), the count says so
        node.store(bytes(data))  # the simulation logs what it applied
        return len(data)

    @_guarded
    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        # O_TRUNC arrives here after the open; os.truncate() arrives without one.  kernfs
        # ignores the size; what decides is the same check as a write open.
        node = self._file(path)
        if not self._can_store(path, node):
            raise OSError(errno.EACCES, path)
        if isinstance(node, LiveFile):  # tracing/set_event, trace: an O_TRUNC open clears
            node.truncate()
        return 0

    @_guarded
    def fallocate(self, path: str, mode: int, offset: int, size: int, fi: Any) -> int:
        """ENODEV, for every file: what fallocate(2) answers for /dev/mem (vfs_fallocate:
        not a regular file or block device).  The kernel's answer for a procfs, sysfs or
        debugfs file, EOPNOTSUPP (no fallocate method), is the one error on which glibc's
        posix_fallocate falls back to writing a zero byte into every block."""
        raise OSError(errno.ENODEV, path)

    # -- names: nothing is created, removed, renamed or linked (docs/control-files.md §11) --

    @_guarded
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        raise OSError(errno.EACCES, path)  # lookup_open(): the directory has no ->create

    @_guarded
    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise OSError(errno.EPERM, path)  # vfs_mknod(): no ->mknod

    @_guarded
    def mkdir(self, path: str, mode: int) -> int:
        raise OSError(errno.EPERM, path)  # kernfs_iop_mkdir() without syscall_ops; debugfs

    @_guarded
    def rmdir(self, path: str) -> int:
        raise OSError(errno.EPERM, path)  # kernfs_iop_rmdir(); vfs_rmdir() without ->rmdir

    @_guarded
    def unlink(self, path: str) -> int:
        raise OSError(errno.EPERM, path)  # vfs_unlink(): no ->unlink

    @_guarded
    def rename(self, old: str, new: str) -> int:
        raise OSError(errno.EPERM, old)  # kernfs_iop_rename() without syscall_ops; debugfs

    @_guarded
    def symlink(self, target: str, source: str) -> int:
        raise OSError(errno.EPERM, target)  # vfs_symlink(): no ->symlink

    @_guarded
    def link(self, target: str, source: str) -> int:
        raise OSError(errno.EPERM, target)  # vfs_link(): no ->link

    # -- attributes: kernfs_iop_setattr() / simple_setattr() keep them ----------------------

    def _setattr(self, path: str, **changes: int) -> int:
        snap = self._snap()
        self.tree.lookup(path, snap)  # ENOENT for a name that does not exist
        if (scope := self._scope(path, snap)) is not None:
            self.scopes[path] = scope
        self.attrs[path] = {**self.attrs.get(path, {}), **changes, "st_ctime": time.time_ns()}
        return 0

    @_guarded
    def chmod(self, path: str, mode: int) -> int:
        return self._setattr(path, mode=mode & 0o7777)

    @_guarded
    def chown(self, path: str, uid: int, gid: int) -> int:
        changes = {k: v for k, v in (("st_uid", uid), ("st_gid", gid)) if v != -1}
        return self._setattr(path, **changes)

    @_guarded
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        now = time.time_ns()
        atime, mtime = times if times is not None else (now, now)
        changes = {k: now if t == UTIME_NOW else t
                   for k, t in (("st_atime", atime), ("st_mtime", mtime)) if t != UTIME_OMIT}
        return self._setattr(path, **changes)

    @_guarded
    def release(self, path: str, fi: Any) -> int:
        self.snaps.pop(fi.fh, None)
        self.handles.pop(fi.fh, None)
        return 0


def serve(tree: Tree, backend: Backend, mountpoint: Path, ready: Callable[[], None]) -> None:
    """Mount and serve until unmounted (SIGTERM/SIGINT/SIGHUP, or fusermount -u).

    Runs libfuse in the calling (main) thread and in the foreground, so that libfuse's own
    signal handlers are the ones that stop it.
    """
    FUSE(ControlFS(tree, backend, ready), str(mountpoint), foreground=True, raw_fi=True,
         allow_other=True, default_permissions=True, fsname="mmud", subtype="mmud", intr=True)
