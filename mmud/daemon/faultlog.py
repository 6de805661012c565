"""The isolation fault log leaves the simulation: published, logged, and kept on disk.

`kvm/fault_log` shows the module's log as the kernel's ring does — cleared when a VM is
created.  So that a restart of the VM or of the daemon loses nothing already logged, each
new entry also becomes a structlog event and one JSON line appended to
`<state-dir>/fault_log.jsonl`.  Both happen between step batches, in the simulation process
(never in a FUSE callback), and only for entries the log has not handed out before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import structlog

from mmud.kvm.isolation import ModuleIsolation

HISTORY = "fault_log.jsonl"

log = structlog.get_logger("mmud.isolation")


class FaultLogPublisher:
    def __init__(self, module: ModuleIsolation, state_dir: str | None) -> None:
        self.module = module
        self.history = Path(state_dir) / HISTORY if state_dir else None
        self._version = -1
        self._lines: tuple[str, ...] = ()

    def logs(self, context: dict[str, Any]) -> dict[str, tuple[str, ...]]:
        """The snapshot's `fault_log` and `isolation/mappings`; new entries persisted first."""
        self._persist(context)
        fault_log = self.module.log
        if fault_log.version != self._version:
            self._lines, self._version = tuple(fault_log.lines), fault_log.version
        return {"fault_log": self._lines, "isolation/mappings": self.module.mm.lines()}

    def _persist(self, context: dict[str, Any]) -> None:
        entries = self.module.log.take_pending()
        if not entries:
            return
        records = [{**context, "lines": list(lines)} for lines in entries]
        for record in records:
            log.info("isolation_fault", **record)
        if self.history is not None:
            with self.history.open("a") as f:
                f.writelines(json.dumps(record) + "\n" for record in records)
