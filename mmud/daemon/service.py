"""The daemon's lifecycle: mount point, simulation, serving, and a clean stop on every path.

Signals: no Python handler is installed for SIGTERM, SIGINT or SIGHUP.  libfuse installs its
own where the disposition is still the default, unmounts on them and returns from the serving
call, and the `finally` below then stops the simulation and says STOPPING=1 — well within
the 2 s a stop may take.  (A Python handler would only run in the main thread, which is
blocked inside libfuse, so the stop would hang until systemd's SIGKILL.)

SIGPIPE: Python ignores it at start-up, so a write to a dead simulation's pipe raises
BrokenPipeError.  libfuse2's fuse_remove_signal_handlers() then sets it back to SIG_DFL on
the way out (it resets whatever is SIG_IGN, not only what it set), which would let the
`stop` sent to a dead simulation kill the daemon (status 141, which systemd counts as a
clean exit).  The `finally` ignores it again before anything is sent.

The simulation dying does not stop the daemon (mmud/daemon/client.py): a stop by signal or
unmount exits 0 whatever state the simulation is in.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import structlog

from mmud.daemon.client import SimClient
from mmud.daemon.mountpoint import prepare
from mmud.daemon.notify import sd_notify
from mmud.daemon.protocol import SimConfig

log = structlog.get_logger("mmud.daemon")

# serve(client, mountpoint, ready): mount, call ready() once mounted, block until unmounted.
Serve = Callable[[SimClient, Path, Callable[[], None]], None]


def run(config: SimConfig, mountpoint: Path, serve: Serve) -> int:
    """Run until unmounted (by a signal or `fusermount -u`); the exit status is 0.

    Raises MountPointError or SimError for a user error, before anything is mounted; any
    other exception propagates after the simulation is stopped (mmud.cli exits 1 on it).
    """
    mnt = prepare(mountpoint)
    client = SimClient(config)

    def ready() -> None:
        log.info("mounted", mountpoint=str(mnt), sim_pid=client.pid)
        sd_notify("READY=1", f"STATUS=mounted on {mnt}")

    try:
        client.start()
        serve(client, mnt, ready)
    finally:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # again: libfuse reset it to SIG_DFL
        sd_notify("STOPPING=1")
        client.stop()
    log.info("stopped", mountpoint=str(mnt), simulation_failure=client.failure)
    return 0
