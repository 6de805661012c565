"""The main process's side of the simulation: start it, read its snapshots, send requests.

One reader thread receives everything the simulation sends.  A snapshot is swapped into
`self.snapshot` (one reference assignment, so FUSE callbacks read it without a lock and never
wait); a reply wakes the callback that sent the request.  The same thread turns the stream
of snapshots into WATCHDOG=1 pings and STATUS= lines, so systemd restarts a stalled
simulation, and only the main process talks to systemd (NotifyAccess=main).
"""

from __future__ import annotations

import errno
import itertools
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import structlog

from mmud.daemon import sim
from mmud.daemon.notify import sd_notify, watchdog_interval
from mmud.daemon.protocol import Reply, Request, SimConfig, Snapshot

# Importing numpy and building the VM takes a while on a cold cache.
START_TIMEOUT_SECONDS = 60.0
# A request is applied within one step batch; this only bounds a wedged simulation.
REQUEST_TIMEOUT_SECONDS = 2.0
# Shutdown must finish within 2 s of SIGTERM; the simulation gets at most this long to exit.
STOP_TIMEOUT_SECONDS = 0.8
# STATUS= lines at most this often when systemd's watchdog does not ask for more.
STATUS_SECONDS = 5.0

log = structlog.get_logger("mmud.daemon")


class SimError(RuntimeError):
    """The simulation could not start (bad configuration) or died."""


class _Pending:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: Reply | None = None


class SimClient:
    """A running simulation process, seen from the FUSE process."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.snapshot: Snapshot | None = None
        self.failure: str | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._send_lock = threading.Lock()
        self._stopping = False
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no FUSE threads, no locks
        child_requests, self._requests = ctx.Pipe(duplex=False)  # (receiving end, sending end)
        self._out, child_out = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=sim.main, name="mmud-sim", daemon=True,
                                 args=(config, child_requests, child_out))
        self._child_ends = (child_requests, child_out)
        self._reader = threading.Thread(target=self._read, name="mmud-sim-reader", daemon=True)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def start(self) -> None:
        """Spawn the process and wait for its first snapshot (or its refusal)."""
        self._proc.start()
        for end in self._child_ends:
            end.close()
        if not self._out.poll(START_TIMEOUT_SECONDS):
            raise SimError("the simulation did not start")
        try:
            first = self._out.recv()
        except EOFError:
            raise SimError("the simulation exited during start-up") from None
        if isinstance(first, Reply):
            raise SimError(first.message)
        self.snapshot = first
        self._reader.start()
        log.info("simulation_started", pid=self._proc.pid)

    def request(self, op: str, **args: Any) -> Reply:
        """Send one request and wait for the simulation to apply it.

        Raises OSError with the reply's errno when the simulation refused it, and ETIMEDOUT
        when it did not answer in time.
        """
        p = _Pending()
        rid = next(self._ids)
        self._pending[rid] = p
        try:
            with self._send_lock:
                self._requests.send(Request(rid, op, args))
            if not p.done.wait(REQUEST_TIMEOUT_SECONDS) or p.reply is None:
                raise OSError(errno.ETIMEDOUT, "the simulation did not answer")
        finally:
            self._pending.pop(rid, None)
        if p.reply.errno:
            raise OSError(p.reply.errno, p.reply.message)
        return p.reply

    def _read(self) -> None:
        interval = watchdog_interval()
        ping_every = min(interval, STATUS_SECONDS) if interval else STATUS_SECONDS
        last_ping = 0.0
        while True:
            try:
                msg = self._out.recv()
            except (EOFError, OSError):
                break
            if isinstance(msg, Reply):
                self._answer(msg)
                continue
            self.snapshot = msg
            if time.monotonic() - last_ping >= ping_every:
                sd_notify(*(["WATCHDOG=1"] if interval else []), "STATUS=" + self.summary())
                last_ping = time.monotonic()
        if not self._stopping:
            self._fail("the simulation process exited")

    def _answer(self, reply: Reply) -> None:
        p = self._pending.get(reply.id)
        if p is not None:
            p.reply = reply
            p.done.set()

    def _fail(self, reason: str) -> None:
        """Record why and stop the daemon the way systemd would: SIGTERM to ourselves."""
        self.failure = reason
        log.error("simulation_failed", reason=reason, exitcode=self._proc.exitcode)
        os.kill(os.getpid(), signal.SIGTERM)

    def summary(self) -> str:
        """One line for STATUS=: each VM's state and step count."""
        snap = self.snapshot
        if snap is None:
            return "starting"
        return ", ".join(f"{v.name} {v.state}, {v.steps} steps" for v in snap.vms)

    def stop(self) -> None:
        """Ask the simulation to exit; kill it if it does not within the shutdown budget."""
        self._stopping = True
        if self._proc.pid is None:
            return  # never started
        try:
            with self._send_lock:
                self._requests.send(Request(0, "stop", {}))
        except OSError:
            pass  # already gone
        self._proc.join(STOP_TIMEOUT_SECONDS)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(STOP_TIMEOUT_SECONDS)
        log.info("simulation_stopped", exitcode=self._proc.exitcode)
