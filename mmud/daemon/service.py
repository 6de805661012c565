"""The daemon's lifecycle: mount point, simulation, serving, and a clean stop on every path.

Signals: no Python handler is installed for SIGTERM, SIGINT or SIGHUP.  libfuse installs its
own where the disposition is still the default, unmounts on them and returns from the serving
call, and the `finally` below then stops the simulation and says STOPPING=1 — well within
the 2 s a stop may take.  (A Python handler would only run in the main thread, which is
blocked inside libfuse, so the stop would hang until systemd's SIGKILL.)
"""

from __future__ import annotations

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
    """Run until unmounted; the exit status is 1 if the simulation died, else 0.

    Raises MountPointError or SimError for a user error, before anything is mounted.
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
        sd_notify("STOPPING=1")
        client.stop()
    log.info("stopped", mountpoint=str(mnt), failure=client.failure)
    return 1 if client.failure else 0
