"""The main process's side of the simulation: start it, supervise it, send it requests.

One supervisor thread receives everything the current simulation process sends.  A snapshot
is swapped into `self.snapshot` (one reference assignment, so FUSE callbacks read it without
a lock and never wait); a reply wakes the callback that sent the request.  The same thread
sends WATCHDOG=1 pings and STATUS= lines while the daemon serves (only the main process
talks to systemd: NotifyAccess=main).

The daemon outlives its simulation.  When the simulation process exits, is killed, or stops
publishing for `HANG_SECONDS` (then it is killed), the supervisor logs `simulation_died`
once and replaces the snapshot with a failed one: every VM reads `failed`, its status names
the cause, statistics and logs keep their last values.  Requests that need the simulation
then fail with EIO at once; parameter stores keep working, because the parameter block lives
here (`self.params`) and is only forwarded to a live simulation (on the store channel, which
a running step looks at: `StoreChannel`; tracing/ writes take it too); `restart` on any
vm<N>/state spawns a fresh simulation with the last configuration of every VM and the current parameters
as its load-time values (docs/daemon.md, "When the simulation dies").
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import structlog

from mmud.daemon import replay, sim
from mmud.daemon.notify import sd_notify, watchdog_interval
from mmud.daemon.protocol import Reply, Request, SimConfig, Snapshot, StoreChannel, VmConfig
from mmud.daemon.status import render_failed_status
from mmud.uapi.params import ParamError, Params, Value

# Importing numpy and building the VM takes a while on a cold cache.
START_TIMEOUT_SECONDS = 60.0
# A request is applied within one step batch; this only bounds a wedged simulation.
REQUEST_TIMEOUT_SECONDS = 2.0
# Shutdown must finish within 2 s of SIGTERM; the simulation gets at most this long to exit.
STOP_TIMEOUT_SECONDS = 0.8
# STATUS= lines at most this often when systemd's watchdog does not ask for more.
STATUS_SECONDS = 5.0
# A simulation publishes every 50 ms (sim.PUBLISH_SECONDS), paused or not; one that sends
# nothing for this long is hung and is killed.  MMUD_SIM_HANG_SECONDS overrides it (tests).
HANG_SECONDS = float(os.environ.get("MMUD_SIM_HANG_SECONDS", "10"))
# What vm<N>/state reads once the simulation process is gone (a guest crash inside a live
# simulation reads "crashed").
FAILED = "failed"

log = structlog.get_logger("mmud.daemon")


class SimError(RuntimeError):
    """The simulation could not start (a configuration it refuses, or it died starting)."""


class SimDead(OSError):
    """A request that needs the simulation while its process is gone: EIO, at once."""


@dataclasses.dataclass(frozen=True)
class _LastWords:
    """What the simulation process sends before an exception ends it."""

    error: str


def _sim_main(config: SimConfig, requests: Connection, out: Connection, stores: StoreChannel) -> None:
    """The spawned process's entry point: the simulation, and its last words if it raises."""
    try:
        sim.main(config, requests, out, replay.serve_paused if config.replay else None, stores)
    except Exception as e:
        with contextlib.suppress(Exception):
            out.send(_LastWords(f"{type(e).__name__}: {e}"))
        raise


def _load_text(value: Value) -> str:
    """A parameter's current value as its setter takes it at load time (`mmu_audit=1`)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


class _Pending:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: Reply | None = None


class _SimProcess:
    """One spawned simulation process, the two pipes to it and its store channel."""

    def __init__(self, config: SimConfig) -> None:
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no FUSE threads, no locks
        child_requests, self.requests = ctx.Pipe(duplex=False)  # (receiving end, sending end)
        self.out, child_out = ctx.Pipe(duplex=False)
        child_stores, self.stores = ctx.Pipe(duplex=False)
        self.posted = ctx.RawValue("Q", 0)  # shared memory: stores sent on `stores` so far
        self.proc = ctx.Process(target=_sim_main, name="mmud-sim", daemon=True,
                                args=(config, child_requests, child_out,
                                      StoreChannel(child_stores, self.posted)))
        self._child_ends = (child_requests, child_out, child_stores)
        self.heard = 0.0  # time.monotonic() of the last message
        self.last_words: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def start(self) -> Snapshot:
        """Spawn it and return its first snapshot; SimError if it refuses or dies first."""
        self.proc.start()
        for end in self._child_ends:
            end.close()
        try:
            if not self.out.poll(START_TIMEOUT_SECONDS):
                self.proc.kill()
                self.reap()
                raise SimError("the simulation did not start")
            first = self.out.recv()
        except (EOFError, OSError):
            self.reap()
            raise SimError(f"the simulation exited during start-up ({self.cause()})") from None
        if isinstance(first, Reply):  # a configuration it refuses
            self.reap()
            raise SimError(first.message)
        if isinstance(first, _LastWords):
            self.last_words = first.error
            self.reap()
            raise SimError(f"the simulation raised {first.error}")
        self.heard = time.monotonic()
        return first

    def reap(self) -> None:
        """Wait for the process to end; kill it if it does not."""
        if self.proc.pid is None:
            return
        self.proc.join(STOP_TIMEOUT_SECONDS)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(STOP_TIMEOUT_SECONDS)

    def cause(self) -> str:
        """Why the process ended, from its last words or its exit status."""
        if self.last_words:
            return f"raised {self.last_words}"
        code = self.proc.exitcode
        if code is None:
            return "pipe closed"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "a signal"
            return f"killed by {name} (signal {-code})"
        return f"exited with status {code}"

    def stop(self) -> None:
        """Ask it to exit; kill it if it does not within the shutdown budget.

        The `stop` is sent without blocking: a hung simulation's full pipe must not hold up
        the shutdown, and a dead one's broken pipe is expected (SIGPIPE is ignored).
        """
        if self.proc.pid is None:
            return  # never started
        with contextlib.suppress(OSError, ValueError):
            os.set_blocking(self.requests.fileno(), False)
            self.requests.send(Request(0, "stop", {}))
        self.reap()

    def send_store(self, req: Request) -> None:
        """A parameter store or a tracing/ write: on its own pipe, then counted in shared
        memory, where the simulation looks for it even inside a step (StoreChannel)."""
        self.stores.send(req)
        self.posted.value += 1

    def close(self) -> None:
        for conn in (self.requests, self.out, self.stores):
            conn.close()


class SimClient:
    """The simulation process, seen from the FUSE process, and a fresh one after a restart."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config  # what the current simulation was started with
        self._original = config
        self.params = Params(config.load)  # the module parameters: owned here, not by a simulation
        self.snapshot: Snapshot | None = None
        self.failure: str | None = None  # why the simulation process is gone, while it is
        self._sim = _SimProcess(config)
        self._starting: _SimProcess | None = None  # a restart in progress
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()  # _sim, failure, snapshot swaps on death/restart, _pending
        self._send_lock = threading.Lock()
        self._control = threading.Lock()  # one parameter store or restart at a time
        self._changed = threading.Event()  # a restart or the stop, for a supervisor waiting on one
        self._stopping = False
        self._supervisor = threading.Thread(target=self._supervise, name="mmud-supervisor",
                                            daemon=True)

    @property
    def pid(self) -> int | None:
        return self._sim.pid

    def start(self) -> None:
        """Spawn the process and wait for its first snapshot (or its refusal)."""
        self.snapshot = self._sim.start()
        self._supervisor.start()
        log.info("simulation_started", pid=self._sim.pid)

    # -- requests -------------------------------------------------------------------------

    def request(self, op: str, **args: Any) -> Reply:
        """Send one request and wait for the simulation to apply it.

        Raises OSError with the reply's errno when the simulation refused it, ETIMEDOUT when
        it did not answer in time, and EIO (SimDead) at once when its process is gone.
        Parameter stores and `restart` are the daemon's own while the simulation is gone.
        """
        if op == "param":
            return self._store_param(**args)
        if op == "tracefs" or op in sim.READ_OPS:
            # A tracing/ write or O_TRUNC open is a switch, as quick as a store; a read is
            # answered at the next store point, even inside a step (docs/daemon.md).
            return self._forward(op, args, store=True)
        if op == "state" and args.get("action") == "restart" and self.failure is not None:
            return self._restart()
        return self._forward(op, args)

    def _forward(self, op: str, args: dict[str, Any], store: bool = False) -> Reply:
        """Send a request (on the store channel if `store`) and wait for its reply."""
        p = _Pending()
        rid = next(self._ids)
        with self._lock:
            if self.failure is not None:
                raise SimDead(errno.EIO, f"the simulation process is gone: {self.failure}")
            sim_proc = self._sim
            self._pending[rid] = p
        try:
            try:
                with self._send_lock:
                    if store:
                        sim_proc.send_store(Request(rid, op, args))
                    else:
                        sim_proc.requests.send(Request(rid, op, args))
            except (OSError, ValueError):  # BrokenPipeError: it died, not noticed yet
                raise SimDead(errno.EIO, "the simulation process is gone") from None
            if not p.done.wait(REQUEST_TIMEOUT_SECONDS):
                raise OSError(errno.ETIMEDOUT, "the simulation did not answer")
            if p.reply is None:  # failed by _died
                raise SimDead(errno.EIO, f"the simulation process died: {self.failure}")
        finally:
            with self._lock:
                self._pending.pop(rid, None)
        if p.reply.errno:
            raise OSError(p.reply.errno, p.reply.message)
        return p.reply

    def _store_param(self, name: str, text: bytes) -> Reply:
        """A run-time store: validated and kept here, applied by a live simulation too."""
        try:
            self.params.parse(name, text)
        except ParamError as e:
            raise OSError(e.errno, str(e)) from None
        with self._control:
            reply: Reply | None = None
            if self.failure is None:
                with contextlib.suppress(SimDead):  # died meanwhile: the block still takes it
                    reply = self._forward("param", {"name": name, "text": text}, store=True)
            self.params[name] = text
            with self._lock:
                if self.failure is not None and self.snapshot is not None:
                    self.snapshot = dataclasses.replace(self.snapshot, params=self.params.render_all())
        return reply or Reply(0, result=self.params.render(name))

    def _restart(self) -> Reply:
        """`echo restart > vm<N>/state` while the simulation is gone: start a fresh one."""
        with self._control:
            if self.failure is None:
                return Reply(0)  # another writer restarted it meanwhile
            config = self._restart_config()
            fresh = self._starting = _SimProcess(config)
            try:
                first = fresh.start()
            except SimError as e:
                log.error("simulation_restart_failed", error=str(e))
                raise SimDead(errno.EIO, f"the simulation did not restart: {e}") from None
            finally:
                self._starting = None
            if self._stopping:
                fresh.stop()
                raise SimDead(errno.EIO, "the daemon is stopping")
            with self._lock:
                old = self._sim
                self.config, self._sim, self.snapshot, self.failure = config, fresh, first, None
            self._changed.set()
        with self._send_lock:
            old.close()
        log.info("simulation_restarted", pid=fresh.pid, previous_pid=old.pid,
                 vms=[c.name for c in config.vms], load=config.load)
        sd_notify("STATUS=" + self.summary())
        return Reply(0)

    def _restart_config(self) -> SimConfig:
        """Every VM of the last snapshot as its config says (the original one's if it has
        none), and the current parameters as load-time values."""
        original = {c.name: c for c in self._original.vms}
        vms: list[VmConfig] = []
        for v in self.snapshot.vms if self.snapshot else ():
            c = v.config or original.get(v.name)
            if c is None:
                log.warning("vm_not_restarted", vm=v.name, reason="no configuration")
            else:
                vms.append(c)
        load: dict[str, str | None] = {n: _load_text(self.params[n]) for n in self.params.names()}
        return dataclasses.replace(self.config, vms=tuple(vms) or self._original.vms, load=load)

    # -- supervision ----------------------------------------------------------------------

    def _supervise(self) -> None:
        """Read the current simulation; notice its death or hang; ping systemd throughout."""
        interval = watchdog_interval()
        ping_every = min(interval, STATUS_SECONDS) if interval else STATUS_SECONDS
        next_ping = 0.0
        while not self._stopping:
            now = time.monotonic()
            if now >= next_ping:
                sd_notify(*(["WATCHDOG=1"] if interval else []), "STATUS=" + self.summary())
                next_ping = now + ping_every
            self._changed.clear()  # before the look, so a restart from now on wakes the wait
            with self._lock:
                sim_proc, dead = self._sim, self.failure is not None
            if dead:
                self._changed.wait(max(0.0, next_ping - time.monotonic()))
                continue
            self._receive(sim_proc, until=next_ping)

    def _receive(self, sim_proc: _SimProcess, until: float) -> None:
        """Handle what arrives before `until`; declare the process dead if it is."""
        hang_at = sim_proc.heard + HANG_SECONDS
        try:
            if not sim_proc.out.poll(max(0.0, min(until, hang_at) - time.monotonic())):
                if time.monotonic() >= hang_at and not self._stopping:
                    sim_proc.proc.kill()
                    sim_proc.reap()
                    self._died(sim_proc, f"hung: nothing received for {HANG_SECONDS:g} s, "
                                         "killed with SIGKILL")
                return
            msg = sim_proc.out.recv()
        except (EOFError, OSError):
            if not self._stopping:
                sim_proc.reap()
                self._died(sim_proc, sim_proc.cause())
            return
        sim_proc.heard = time.monotonic()
        if isinstance(msg, Reply):
            self._answer(msg)
        elif isinstance(msg, _LastWords):
            sim_proc.last_words = msg.error
        else:
            self.snapshot = msg

    def _answer(self, reply: Reply) -> None:
        p = self._pending.get(reply.id)
        if p is not None:
            p.reply = reply
            p.done.set()

    def _died(self, sim_proc: _SimProcess, cause: str) -> None:
        """Keep serving without it: a failed snapshot, EIO for whoever waits on it."""
        with self._lock:
            self.failure = cause
            last = self.snapshot
            if last is not None:
                self.snapshot = dataclasses.replace(
                    last, seq=last.seq + 1, params=self.params.render_all(),
                    vms=tuple(dataclasses.replace(v, state=FAILED,
                                                  status=render_failed_status(v.status, cause, v.steps))
                              for v in last.vms))
            waiting, self._pending = list(self._pending.values()), {}
        for p in waiting:
            p.done.set()  # without a reply: SimDead
        log.error("simulation_died", cause=cause, pid=sim_proc.pid,
                  steps={v.name: v.steps for v in last.vms} if last else {})
        sd_notify("STATUS=" + self.summary())

    def summary(self) -> str:
        """One line for STATUS=: each VM's state and step count, or why the simulation failed."""
        if self.failure is not None:
            return (f"simulation failed ({self.failure}); serving its last values; "
                    "echo restart > vm<N>/state starts it again")
        snap = self.snapshot
        if snap is None:
            return "starting"
        return ", ".join(f"{v.name} {v.state}, {v.steps} steps" for v in snap.vms)

    def stop(self) -> None:
        """Stop the simulation (and one a restart is starting) within the shutdown budget."""
        self._stopping = True
        self._changed.set()
        for sim_proc in (self._starting, self._sim):
            if sim_proc is not None:
                sim_proc.stop()
        log.info("simulation_stopped", exitcode=self._sim.proc.exitcode)
