"""Mount point checks: create a missing one, clear a stale one, refuse an unusable one.

A FUSE mount whose daemon died (SIGKILL, a crash) stays in the mount table, and for about a
second after the death `stat` still succeeds from the kernel's attribute cache
(attr_timeout).  Only an operation that must reach the daemon tells a dead mount from a
live one: listing the directory fails with ENOTCONN (ECONNABORTED once the connection was
aborted through fusectl) on a dead one, which is then lazily unmounted.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import structlog

log = structlog.get_logger("mmud.daemon")


class MountPointError(Exception):
    """A mount point the user must fix; reported as one line and exit status 2."""


def _unescape(field: str) -> str:
    """/proc/self/mounts writes space, tab, newline and backslash as \\ooo octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def is_mounted(path: str | os.PathLike[str]) -> bool:
    target = os.path.abspath(path)
    with open("/proc/self/mounts") as f:
        return any(_unescape(line.split()[1]) == target for line in f)


def _lazy_unmount(path: Path) -> None:
    """Detach a dead FUSE mount (`Transport endpoint is not connected`) left by a crash."""
    cmd = ["fusermount", "-u", "-z", str(path)] if shutil.which("fusermount") else \
        ["umount", "-l", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise MountPointError(f"{path}: cannot clear stale mount: {done.stderr.strip()}")
    log.warning("stale_mount_cleared", mountpoint=str(path))


# What an operation on a FUSE mount without a daemon fails with.
_DEAD_MOUNT = (errno.ENOTCONN, errno.ECONNABORTED)


def prepare(path: Path) -> Path:
    """Return the absolute mount point, ready to mount on, or raise MountPointError."""
    path = path.absolute()
    try:
        path.stat()
    except FileNotFoundError:
        path.mkdir(parents=True)
        return path
    except OSError as e:
        if e.errno not in _DEAD_MOUNT:
            raise MountPointError(f"{path}: {e.strerror}") from None
        _lazy_unmount(path)
    if is_mounted(path):
        try:
            os.listdir(path)  # reaches the daemon: a cached stat does not prove one is there
        except OSError as e:
            if e.errno not in _DEAD_MOUNT:
                raise MountPointError(f"{path}: {e.strerror}") from None
            _lazy_unmount(path)
        else:
            raise MountPointError(f"{path}: already a mount point (is another mmud running?)")
    if not path.is_dir():
        raise MountPointError(f"{path}: not a directory")
    if any(path.iterdir()):
        raise MountPointError(f"{path}: directory not empty")
    return path
