"""The isolation fault log leaves the simulation: published, logged, and kept on disk.

`kvm/fault_log` shows the module's log as the kernel's ring does — cleared when a VM is
created — and `kvm/isolation/faults` mmud's table of the logged faults with their counts.
So that a restart of the VM or of the daemon loses nothing already logged, each new entry
also becomes a structlog event and one JSON line appended to `<state-dir>/fault_log.jsonl`.
Both happen between step batches, in the simulation process (never in a FUSE callback), and
only for entries the log has not handed out before.
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
        self._table_version = -1
        self._table: tuple[str, ...] = ()

    def logs(self, context: dict[str, Any]) -> dict[str, tuple[str, ...]]:
        """The snapshot's `fault_log`, `isolation/faults` and `isolation/mappings`; new entries
        persisted first.  The log and the table are copied only when their version moved
        (the table's moves with every repeated fault, the log's only with new entries)."""
        self._persist(context)
        fault_log = self.module.log
        if fault_log.version != self._version:
            self._lines, self._version = tuple(fault_log.lines), fault_log.version
        if fault_log.table_version != self._table_version:
            self._table, self._table_version = fault_log.table_lines(), fault_log.table_version
        return {"fault_log": self._lines, "isolation/faults": self._table,
                "isolation/mappings": self.module.mm.lines()}

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
