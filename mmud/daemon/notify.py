"""sd_notify(3) without a library: one datagram of KEY=VALUE lines to $NOTIFY_SOCKET.

Only the main process may notify under NotifyAccess=main, so the simulation process never
calls this; the main process relays its health as WATCHDOG=1 and STATUS= lines.
"""

from __future__ import annotations

import os
import socket


def sd_notify(*lines: str) -> bool:
    """Send lines; False (never an exception) when not under systemd or the socket is gone.

    It is called from the FUSE init() callback, where an exception would abort the mount.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall("\n".join(lines).encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when it is off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
