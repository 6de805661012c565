"""The one adapter to the FUSE binding (mfusepy, with the fusepy API).

Kernel semantics it adds on top of the node types (docs/control-files.md §11):
- every open gets direct I/O and a private rendering of the file, taken at open, so `cat`
  sees the whole current content whatever size was last reported (st_size is 0, procfs style);
- a write open or truncate of a file without a store fails with EACCES even for root, which
  `default_permissions` alone would let through;
- each write(2) is one complete store, its offset ignored as sysfs ignores it; a zero-length
  write returns 0 without a store;
- callbacks only read the latest snapshot or send a request; they do no file I/O (not even
  logging: the simulation logs each store it applies, with its step) and never touch the
  mount point.  The one exception is the `mounted` event at init().
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from stat import S_IFDIR, S_IFREG
from typing import Any

from mfusepy import FUSE, Operations

from mmud.daemon.protocol import Snapshot
from mmud.fs.nodes import Backend, BinaryFile, Dir, File, Handle
from mmud.fs.tree import Tree


class ControlFS(Operations):
    use_ns = True

    def __init__(self, tree: Tree, backend: Backend, ready: Callable[[], None]) -> None:
        self.tree, self.backend, self.ready = tree, backend, ready
        self.snaps: dict[int, bytes] = {}
        self.handles: dict[int, Handle] = {}  # opens of BinaryFiles: I/O by offset
        self.ids = itertools.count(1)
        self.mtime_ns = time.time_ns()  # like sysfs: the time the file appeared

    def _snap(self) -> Snapshot:
        snap = self.backend.snapshot
        assert snap is not None  # the daemon mounts only after the first snapshot
        return snap

    def _file(self, path: str) -> File | BinaryFile:
        node = self.tree.lookup(path, self._snap())
        if isinstance(node, Dir):
            raise OSError(errno.EISDIR, path)
        return node

    def _writable(self, path: str) -> File | BinaryFile:
        node = self._file(path)
        if not node.writable:
            raise OSError(errno.EACCES, path)
        return node

    def init(self, path: str) -> None:
        self.ready()  # the mount is in /proc/self/mounts by now

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        node = self.tree.lookup(path, self._snap())
        kind, nlink = (S_IFDIR, 2) if isinstance(node, Dir) else (S_IFREG, 1)
        t = self.mtime_ns
        return {"st_mode": kind | node.mode, "st_nlink": nlink, "st_size": 0, "st_uid": 0,
                "st_gid": 0, "st_atime": t, "st_mtime": t, "st_ctime": t}

    def readdir(self, path: str, fh: Any) -> list[str]:
        node = self.tree.lookup(path, self._snap())
        if not isinstance(node, Dir):
            raise OSError(errno.ENOTDIR, path)
        return [".", "..", *node.children(self._snap())]  # names only, never offsets

    def open(self, path: str, fi: Any) -> int:
        writing = (fi.flags & os.O_ACCMODE) != os.O_RDONLY
        node = self._writable(path) if writing else self._file(path)
        if (fi.flags & os.O_ACCMODE) != os.O_WRONLY and not node.mode & 0o444:
            raise OSError(errno.EACCES, path)  # a write-only file has no show method
        fi.direct_io, fi.fh = 1, next(self.ids)
        if isinstance(node, BinaryFile):
            self.handles[fi.fh] = node.open_handle()
            return 0
        self.snaps[fi.fh] = node.render(self._snap()) if node.mode & 0o444 else b""
        return 0  # with raw_fi this is a status, not the handle

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        if (handle := self.handles.get(fi.fh)) is not None:
            return handle.read(offset, size)
        return self.snaps.get(fi.fh, b"")[offset:offset + size]

    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        if not data:
            return 0  # sysfs never hands an empty buffer to a setter
        if (handle := self.handles.get(fi.fh)) is not None:
            return handle.write(offset, bytes(data))  # a byte file: positioned, short writes
        node = self._writable(path)
        if isinstance(node, BinaryFile):
            raise OSError(errno.EBADF, path)  # written only through the handle its open made
        node.store(bytes(data))  # the simulation logs what it applied
        return len(data)

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        self._writable(path)  # O_TRUNC arrives here; os.truncate() arrives without an open
        return 0

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
         allow_other=True, default_permissions=True, fsname="mmud", subtype="mmud")
