"""Replay a recording (mmud/daemon/recording.py): the same run, offline, compared as it goes.

A replay builds the simulation the first line describes and feeds it the recorded events
through the simulation's own code: requests through `Simulation.dispatch`, the stepping
through `Simulation.step_round` — so no operation has a second implementation here.
Before each event every VM is stepped, chunk by chunk as the run stepped it, to the step
count recorded with the event (a store the run took inside a step is applied inside the same
chunk, at the same audit store point); VMs couple only through events (a migration), and the
round order is the run's, so what the VMs share in the module (the audit's limiter and log)
comes out the same.  At each checkpoint line the VM's digest is compared with the recorded
one; the first difference is the divergence, reported with the part that differs and the
last event before it (docs/replay.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from mmud.daemon.protocol import Request, SimConfig
from mmud.daemon.recording import (FORMAT, VERSION, Recorder, SlotView, code_digest, config_of,
                                   decode, digest, differing)
from mmud.daemon.sim import Simulation
from mmud.machine import VM
from mmud.kvm.trace.tracer import TraceSession

# What `--audit` forces: the audit on, at every point; a recorded store of one of these is
# applied, then forced back.
AUDIT_PARAMS = {"mmu_audit": b"1", "mmu_audit_ratelimit_ms": b"0"}

EXIT_USAGE = 2  # as `mmud run`: a recording this mmud cannot replay

log = structlog.get_logger("mmud.replay")


class RecordingError(ValueError):
    """Not a recording this mmud can replay (a newer major version, not a recording)."""


def read(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The first line and the others of a recording.  A last line without its newline is a
    write the run did not finish (a crash): it is left out."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    lines.pop()  # after the last newline: empty, or a torn line
    try:
        head = json.loads(lines[0]) if lines else None
    except ValueError:
        head = None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise RecordingError(f"{path}: not an mmud recording")
    major = str(head.get("version", "")).partition(".")[0]
    if not major.isdigit() or int(major) > int(VERSION.partition(".")[0]):
        raise RecordingError(f"{path}: recording format version {head.get('version')} is newer "
                             f"than this mmud reads ({VERSION}); replay it with a newer mmud")
    try:
        return head, [json.loads(line) for line in lines[1:]]
    except ValueError as e:
        raise RecordingError(f"{path}: a line is not JSON: {e}") from None


@dataclass
class Divergence:
    """Where a replay first differs from its recording."""

    seq: int  # the recording line
    what: str  # "checkpoint" or "event"
    vm: str
    step: int
    part: str  # the digest part that differs ("steps", "reply", "vms" for an event)
    detail: str
    last_event: dict[str, Any] | None

    def render(self) -> str:
        text = (f"divergence at {self.what} {self.seq} ({self.vm}, step {self.step}): "
                f"{self.part} differs: {self.detail}\n")
        if self.last_event is not None:
            text += f"last event before it: {describe(self.last_event)}\n"
        return text


def describe(event: dict[str, Any]) -> str:
    """One event as a line: its number, op, arguments (bytes by their size), step counts."""
    args = {k: f"<{len(v)} bytes>" if isinstance(v, bytes) and len(v) > 32 else v
            for k, v in decode(event["args"]).items()}
    steps = ", ".join(f"{n} {s}" for n, s in event["steps"].items())
    return f"seq {event['seq']} {event['op']} {args} at steps {steps}"


@dataclass
class Outcome:
    """What a replay found."""

    through: int = 0  # the first VM's step at the last checkpoint found identical
    checkpoints: int = 0
    events: int = 0
    complete: bool = False  # the recording ends with the run's final checkpoints
    stopped_at: int | None = None  # --until: the first VM's step where the replay stopped
    code_differs: bool = False  # the run's mmud code is not this one (a likely cause)
    divergence: Divergence | None = None
    audit_error: str | None = None  # --audit: where the audit first reported an error

    def render(self) -> str:
        if self.divergence is not None:
            text = self.divergence.render()
        else:
            text = (f"identical through step {self.through} ({self.checkpoints} checkpoints, "
                    f"{self.events} events)\n")
            if self.stopped_at is not None:
                text += f"stopped at step {self.stopped_at} (--until)\n"
            elif not self.complete:
                text += "the recording ends before the run's final checkpoint (cut short)\n"
        if self.code_differs:
            text += "note: the recording was made by other mmud code than this\n"
        if self.audit_error is not None:
            text += self.audit_error + "\n"
        return text


class _Checker(Recorder):
    """The replay's recorder: records nothing; watches each chunk for `--audit` and
    `--trace`."""

    def __init__(self, audit: bool, emit: Callable[[str], None]) -> None:
        self.audit = audit
        self.emit = emit
        self.sessions: list[TraceSession] = []
        self.first_error: str | None = None
        self.last_event: dict[str, Any] | None = None

    def chunk_done(self, s: SlotView, steps: dict[str, int]) -> None:
        self.watch([s])

    def watch(self, slots: Sequence[SlotView]) -> None:
        for session in self.sessions:
            for line in session.lines():
                self.emit(line + "\n")
        if self.audit and self.first_error is None:
            for s in slots:
                if s.vm.stat["mmu_audit_errors"]:
                    after = describe(self.last_event) if self.last_event else "the start"
                    lines = "".join(f"  {line}" for line in itertools.islice(
                        s.vm.module.audit.lines, 3))
                    self.first_error = (f"audit errors first at {s.name} step {s.vm.steps} "
                                        f"(after {after}):\n{lines}".rstrip("\n"))
                    break


class Replay:
    """One replay of a recording into a fresh simulation (`sim`)."""

    def __init__(self, path: str | Path, *, until: int | None = None, audit: bool = False,
                 trace: str | None = None, emit: Callable[[str], None] = lambda text: None,
                 sim: Simulation | None = None) -> None:
        self.head, self.lines = read(path)
        self.until, self.audit = until, audit
        config = config_of(self.head)
        if audit:
            config = SimConfig(vms=config.vms, load={**config.load, **{
                n: v.decode() for n, v in AUDIT_PARAMS.items()}})
        self.sim = sim or Simulation.offline(config)
        self.checker = _Checker(audit, emit)
        self.sim.recorder = self.checker
        if trace:
            self.checker.sessions = [s.vm.trace(trace.split(",")) for s in self.sim.slots]
        self.first = self.sim.slots[0].name  # the service's VM: --until and `through` count its steps
        self.missed: str | None = None  # the first event applied off its recorded step
        self.events = 0  # events applied as recorded

    def run(self) -> Outcome:
        out = Outcome(code_differs=self.head.get("code") != code_digest())
        audit = self.sim.module.audit
        notice, audit.notice = audit.notice, None  # only recorded stores land (`mount`)
        k = 0
        try:
            while k < len(self.lines):
                line = self.lines[k]
                if self.until is not None and line["steps"].get(self.first, 0) > self.until:
                    self._advance({self.first: self.until})
                    out.stopped_at = self.sim.slots[0].vm.steps
                    break
                group = self._one_chunk(k) if "point" in line else [line]
                out.divergence = (self._event(group) if "op" in line else self._checkpoint(line, out))
                if out.divergence is not None:
                    break
                k += len(group)
            else:
                out.complete = any(line.get("final") for line in self.lines)
        finally:
            audit.notice = notice
            self.checker.watch(self.sim.slots)
            for session in self.checker.sessions:
                session.close()
        out.events = self.events
        out.audit_error = self.checker.first_error
        return out

    def _one_chunk(self, k: int) -> list[dict[str, Any]]:
        """The stores from line k on that the run took inside one chunk: same VM, same
        step counts (recorded in the order they landed)."""
        first = self.lines[k]
        group = [first]
        for line in self.lines[k + 1:]:
            if line.get("in") != first["in"] or line["steps"] != first["steps"]:
                break
            group.append(line)
        return group

    # -- one line -------------------------------------------------------------------------

    def _event(self, group: list[dict[str, Any]]) -> Divergence | None:
        """Apply one event (or the stores taken inside one chunk) where it was recorded.
        An event that cannot land on its step (the replay already differs) is applied at
        the first chunk boundary past it; the next checkpoint then reports the divergence,
        with this as its first sign."""
        line = group[0]
        if (missed := self._advance(line["steps"])) is not None and self.missed is None:
            self.missed = f"event {line['seq']} applied off its step: {missed}"
        if "point" in line:
            return self._in_step(group)
        return self._apply(line)

    def _in_step(self, group: list[dict[str, Any]]) -> Divergence | None:
        """Stores the run took inside a step: run the chunk they landed in and apply each
        at its recorded store point.  With `--audit` the audit runs at other points (their
        count differs), so they are applied when the chunk ends."""
        s = next((s for s in self.sim.slots if s.name == group[0]["in"]), None)
        audit = self.sim.module.audit
        todo = list(group)
        found: list[Divergence] = []

        def notice() -> None:
            while todo and not found and audit.points == todo[0]["point"]:
                if (d := self._apply(todo.pop(0))) is not None:
                    found.append(d)

        if s is not None:
            audit.notice = None if self.audit else notice
            try:
                self.sim.step_round([s])
            finally:
                audit.notice = None
        if todo and not found and not self.audit and self.missed is None:
            self.missed = (f"event {todo[0]['seq']} applied after its chunk: store point "
                           f"{todo[0]['point']} in {todo[0]['in']} not reached")
        while todo and not found:
            if (d := self._apply(todo.pop(0))) is not None:
                found.append(d)
        return found[0] if found else None

    def _apply(self, line: dict[str, Any]) -> Divergence | None:
        """An event through the simulation's own code; its errno must be the recorded one."""
        result = self._dispatch(line)
        if result is None:
            self.events += 1
            self.checker.last_event = line
        return result

    def _dispatch(self, line: dict[str, Any]) -> Divergence | None:
        op, args = line["op"], decode(line["args"])
        if op in ("crash", "paused"):
            s = next((s for s in self.sim.slots if s.name == args["vm"]), None)
            if s is None:
                return self._diverged(line, "event", "vms", f"no {args['vm']} in the replay")
            if op == "crash":  # the VM raised in its chunk: run that chunk again
                self.sim.step_round([s])
                if s.failure is None:
                    return self._diverged(line, "event", "state", "recorded a crash, replayed none")
            elif s.running:  # a break or `step N` paused it while stepping: so it must be now
                return self._diverged(line, "event", "state",
                                      f"recorded a pause ({args['why']}), replayed running")
            return None
        reply = self.sim.dispatch(Request(line["seq"], op, args))
        if self.audit and op == "param" and args["name"] in AUDIT_PARAMS:
            self.sim.params[args["name"]] = AUDIT_PARAMS[args["name"]]
        self.checker.watch(self.sim.slots)
        if reply.errno != line["errno"]:
            return self._diverged(line, "event", "reply",
                                  f"recorded errno {line['errno']}, replayed {reply.errno} "
                                  f"({reply.message})")
        return None

    def _checkpoint(self, line: dict[str, Any], out: Outcome) -> Divergence | None:
        self._advance(line["steps"])
        s = next((s for s in self.sim.slots if s.name == line["checkpoint"]), None)
        if s is None:
            return self._diverged(line, "checkpoint", "vms", f"no {line['checkpoint']} in the replay")
        found = differing(line["digest"], digest(s), skip=("audit",) if self.audit else ())
        if found is not None:
            return self._diverged(line, "checkpoint", *found)
        out.checkpoints += 1
        out.through = line["steps"].get(self.first, out.through)
        return None

    def _diverged(self, line: dict[str, Any], what: str, part: str, detail: str) -> Divergence:
        vm = line.get("checkpoint") or decode(line.get("args", {})).get("vm") or self.first
        if self.missed is not None:
            detail += f"; first sign: {self.missed}"
        return Divergence(line["seq"], what, vm, line["steps"].get(vm, 0), part, detail,
                          self.checker.last_event)

    def _advance(self, targets: dict[str, int]) -> str | None:
        """Step the VMs, in the run's rounds, to their recorded step counts (each VM's
        chunks end on the same counts as in the run); what is off if one cannot get there
        exactly (paused or crashed before it, a count passed, a VM missing)."""
        while True:
            below = [s for s in self.sim.slots
                     if s.name in targets and s.vm.steps < targets[s.name]]
            if not any(s.running for s in below):
                break
            before = [s.vm.steps for s in below]
            self.sim.step_round(below)
            if [s.vm.steps for s in below] == before and not any(s.failure for s in below):
                break  # nothing left to run in them
        off = [f"{s.name} at step {s.vm.steps} ({s.state}), recorded {targets[s.name]}"
               for s in self.sim.slots if s.name in targets and s.vm.steps != targets[s.name]]
        names = sorted(s.name for s in self.sim.slots)
        if names != sorted(targets):
            off.append(f"VMs recorded {sorted(targets)}, replayed {names}")
        return "; ".join(off) or None


def _print(text: str) -> None:
    sys.stdout.write(text)


def replay(path: str | Path, until: int | None = None) -> dict[str, VM]:
    """`mmud.replay(path, until=None)`: rebuild a recorded run (up to step `until` of its
    first VM) and return its VMs by name, to inspect through the Python API.  Whether it
    matched its recording is `mmud replay`'s to say (`Replay(path).run()`)."""
    r = Replay(path, until=until)
    r.run()
    return {s.name: s.vm for s in r.sim.slots}


def serve_paused(sim: Simulation) -> None:
    """`mmud replay --mount`: replay the recording into the daemon's own simulation, then
    pause every VM there, so that every control file shows the run as it was."""
    assert sim.config.replay is not None
    outcome = Replay(sim.config.replay, until=sim.config.replay_until, sim=sim).run()
    sim.recorder = Recorder()
    for s in sim.slots:
        s.running = False
    log.info("replay_finished", path=sim.config.replay, result=outcome.render().strip(),
             steps=sim.step_counts())


def command(path: Path, *, until: int | None, audit: bool, trace: str | None,
            mount: Callable[[SimConfig], int] | None) -> int:
    """`mmud replay FILE`: 0 and `identical through step S`, 1 and the first divergence, 2
    for a file it cannot replay.  With `mount`, the replay runs in the daemon's simulation
    instead, which then serves its control files with every VM paused (`mount` runs it)."""
    try:
        head, _ = read(path)
        if mount is not None:
            return mount(dataclasses.replace(config_of(head), replay=str(path), replay_until=until))
        outcome = Replay(path, until=until, audit=audit, trace=trace, emit=_print).run()
    except (RecordingError, OSError) as e:
        print(f"mmud: {e}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(outcome.render())
    return 1 if outcome.divergence is not None else 0
