"""A stand-in for the simulation, for in-process tests of the control filesystem.

It holds a hand-built `Snapshot` and records every request instead of applying it, so a test
sees exactly what a write would have asked of the simulation — and that a refused write asked
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmud.daemon.protocol import Reply, Snapshot, VmSnapshot
from mmud.uapi.params import Params
from mmud.uapi.stats import STATS

Request = tuple[str, dict[str, Any]]


def vm_snapshot(name: str, debugfs_dir: str, **fields: Any) -> VmSnapshot:
    """A VM with every stat at 0 unless `stats` says otherwise; other fields as given."""
    stats = {s.name: 0 for s in STATS} | fields.pop("stats", {})
    defaults: dict[str, Any] = {"state": "running", "steps": 0, "status": "state: running\n"}
    return VmSnapshot(name, debugfs_dir, stats=stats, **(defaults | fields))


def snapshot(*vms: VmSnapshot, params: Params | None = None,
             logs: dict[str, tuple[str, ...]] | None = None, seq: int = 1) -> Snapshot:
    """A snapshot of `vms`, with parameter files rendered from `params` as the simulation does."""
    p = params or Params()
    return Snapshot(seq, {n: p.render(n) for n in p.names()}, vms, logs or {})


@dataclass
class FakeBackend:
    """Records requests; answers each from `results` (a value, or a function of the request's
    arguments) or fails it with the errno in `errors`, as SimClient.request does."""

    snapshot: Snapshot | None
    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def request(self, op: str, **args: Any) -> Reply:
        self.requests.append((op, args))
        if op in self.errors:
            raise OSError(self.errors[op], f"the simulation refused {op}")
        result = self.results.get(op)
        if callable(result):
            result = result(**args)
        return Reply(len(self.requests), result=result)
