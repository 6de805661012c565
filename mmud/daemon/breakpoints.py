"""Run control of one VM in the simulation: `echo step N > vm<N>/state` and `vm<N>/break`.

A VM with nothing armed is stepped by the simulation loop as before, one `VM.step` call per
chunk, so run control costs it nothing.  With a step target or a break armed,
`RunControl.run` steps its chunk instead, in pieces cut so that the VM stops exactly where
the condition holds, and no finer than that needs:

- a step target (`step N`, `step=N`) ends a piece on it, and the other pieces stay whole;
- `audit_error` steps one step at a time while the audit is on, comparing the VM's
  `mmu_audit_errors` after each (an audit runs inside a step, so a step is the finest grain
  there is); while the audit is off no error can be reported and the pieces stay whole;
- `guest_crash` needs no finer pieces: a step that raises is not counted and the steps
  before it are (`VM.step`), so the count at the crash is exact.

Requests are applied between batches only, so a break fires at the same step on every run
of the same seed with the same writes at the same steps (docs/daemon.md).  The pause point is
the VM's step count, what `vm<N>/status` shows: for `audit_error` and `step=N` it counts the
step that reported or reached it; for `guest_crash`, the steps before the one that raised.
A step in which a vCPU is preempted runs other tasks' steps inside it, and they count too,
so in a VM with several tasks a target may be passed by those few steps: the VM stops at the
first step boundary at or past it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmud.uapi.runcontrol import AUDIT_ERROR, GUEST_CRASH, NO_BREAK, STEP, render_break

if TYPE_CHECKING:
    from mmud.machine import VM

STEPPED = "stepped"  # why RunControl.run paused a VM: its `step N` is done


@dataclass
class RunControl:
    """One VM's armed break, its pending `step N` and the last break that fired."""

    kind: str = NO_BREAK  # the armed condition (mmud.uapi.runcontrol)
    at: int | None = None  # the step of a `step=N` break
    stop_at: int | None = None  # the step count a pending `step N` pauses at
    hit: int | None = None  # the step at which the armed condition last fired

    @property
    def armed(self) -> bool:
        return self.kind != NO_BREAK or self.stop_at is not None

    def arm(self, kind: str, step: int | None = None) -> None:
        """A write to vm<N>/break: the new condition (`none` disarms) forgets the last hit."""
        self.kind, self.at, self.hit = kind, step if kind == STEP else None, None

    def restarted(self) -> RunControl:
        """What a restarted VM keeps: the armed break, as a debugger keeps its breakpoints
        across a new run; the pending `step N` and the hit belong to the old run."""
        return RunControl(self.kind, self.at)

    def render(self) -> str:
        """The vm<N>/break text: the armed condition, then the last hit if one fired."""
        condition = render_break(self.kind, self.at)
        hit = f"hit {condition} at step {self.hit}\n" if self.hit is not None else ""
        return f"{condition}\n{hit}"

    def status_lines(self, running: bool) -> list[tuple[str, str]]:
        """vm<N>/status lines: the armed break and its last hit, the pending step target."""
        lines = []
        if self.kind != NO_BREAK:
            hit = f", hit at step {self.hit}" if self.hit is not None else ""
            lines.append(("break", render_break(self.kind, self.at) + hit))
        if running and self.stop_at is not None:
            lines.append(("step to", str(self.stop_at)))
        return lines

    def run(self, vm: VM, budget: int) -> str | None:
        """Step `vm` up to `budget` steps (the loop's chunk), stopping exactly where a
        condition holds.

        Returns why the VM must pause there — the condition that fired, or STEPPED when a
        `step N` is done (or the guest has nothing left to run) — or None to go on.  An
        exception from the VM propagates: the caller crashes the VM and calls `crashed`."""
        done = 0
        stat = vm.stat
        while done < budget:
            n = self._piece(vm, budget - done)
            before, errors = vm.steps, stat["mmu_audit_errors"]
            ran = vm.step(n)
            done += ran or 1
            if self.kind == AUDIT_ERROR and stat["mmu_audit_errors"] > errors:
                return self._fire(vm.steps)
            if self.kind == STEP and self.at is not None and before < self.at <= vm.steps:
                return self._fire(vm.steps)
            if self.stop_at is not None and (vm.steps >= self.stop_at or ran < n):
                self.stop_at = None
                return STEPPED
        return None

    def crashed(self, steps: int) -> str | None:
        """The VM crashed at `steps`: a `guest_crash` break fires there (returns it)."""
        self.stop_at = None
        return self._fire(steps) if self.kind == GUEST_CRASH else None

    def _piece(self, vm: VM, n: int) -> int:
        if self.kind == AUDIT_ERROR and vm.mmu.audit_enabled:
            return 1
        for target in (self.stop_at, self.at):
            if target is not None and target > vm.steps:
                n = min(n, target - vm.steps)
        return n

    def _fire(self, steps: int) -> str:
        self.hit, self.stop_at = steps, None
        return render_break(self.kind, self.at)
