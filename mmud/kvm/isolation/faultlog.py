"""The isolation fault log: the series' kvm_log_page_fault() rules and message format.

- A fault is logged only the first time its IP is seen; the table holds
  KVM_LAST_FAULT_COUNT IPs and is cleared when a VM is created (kvm_isolation_init_vm).
- The fault that finds the table full is logged after a `fault tracking buffer is full`
  warning, with the number 128.  The kernel repeats both lines for every later fault of an
  untracked IP, which buries the log; mmud prints the warning and that one entry once, and
  only counts the faults after it (`dropped`).
- An entry is `KVM isolation: page fault #<n> (<error code>) at <ip %pS> on <address %px>
  (<address %pS>)`, then, with page_fault_stack=Y, a `Call Trace:` of the callers.  `%pS`
  of the address names a kernel-image or module symbol and is a bare `0x…` for anything
  allocated (layout.SymbolTable.sprint_symbol), exactly as the kernel prints it.

Every line carries a printk stamp `[seconds.micros]` of the VM's simulated clock (time since
the VM was created), so a run's log is the same for the same seed.  New entries also wait in
`pending` until the owner of the process (the daemon) persists and logs them; each pending
entry remembers the VM that took the fault (the log is the module's, shared by its VMs) and,
for a logged fault, its table row, so that a persisted record says whose fault it was and
what the table showed.

Beside the kernel's log, mmud keeps a table of its own (`kvm/isolation/faults`, not a kernel
file): one row per logged entry — entry number, IP, address, the object hit in mmud's naming
(`mmu_page_hash+0x30e0`) and how often that IP has faulted so far.  The count changes on
every repeated fault, so the table has a version of its own (`table_version`): the log's
`version`, and the copy of the log a publisher makes, stay put.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmud.kvm.isolation.symbols import Symbol
    from mmud.kvm.vm import Kvm

KVM_LAST_FAULT_COUNT = 128
LOG_LINES = 8192  # the ring keeps the newest lines, as the printk buffer does
IP_WIDTH, OBJECT_WIDTH = 40, 28  # columns of the table (wider values push the next one right)


def table_row(n: int | str, ip: str, address: int | str, obj: str) -> str:
    """The table's columns before the count: `entry ip address object `."""
    where = address if isinstance(address, str) else f"{address:016x}"
    return f"{n:>5} {ip:<{IP_WIDTH}} {where:<16} {obj:<{OBJECT_WIDTH}} "


TABLE_HEADER = table_row("entry", "ip", "address", "object") + "count"


@dataclass(frozen=True)
class Row:
    """A logged fault's table columns before the count (`key` is the IP its count is kept by)."""

    entry: int
    ip: str  # function+0xoff/0xsize
    address: int
    object: str
    key: int


@dataclass(frozen=True)
class Pending:
    """An entry not yet handed to the daemon: its stamped lines, the VM whose fault it is
    (None when the caller did not say) and, for a logged fault, its table row."""

    lines: tuple[str, ...]
    vm: Kvm | None = None
    row: Row | None = None


def stamp(ns: int) -> str:
    """printk's `[%5lu.%06lu] ` time prefix."""
    return f"[{ns // 1_000_000_000:5d}.{ns // 1000 % 1_000_000:06d}] "


class FaultLog:
    def __init__(self) -> None:
        self.lines: deque[str] = deque(maxlen=LOG_LINES)
        self.pending: list[Pending] = []  # entries not yet handed to the daemon
        self.version = 0  # bumped on every change, so a publisher can skip unchanged logs
        self.table_version = 0  # the same for the table (bumped by every fault of a logged IP)
        self.clear()

    def clear(self) -> None:
        """kvm_clear_page_fault(): forget every IP and empty the log (and the table)."""
        self.ips: dict[int, int] = {}
        self.full = False
        self.dropped = 0
        self.lines.clear()
        self.version += 1
        self.rows: dict[int, str] = {}  # logged IP -> its table row up to the count
        self.counts: dict[int, int] = {}  # logged IP -> faults of it so far
        self.table_version += 1

    def track(self, ip: int) -> int | None:
        """The entry number of a new IP, or None if it is not to be logged."""
        if ip in self.counts:
            self.counts[ip] += 1
            self.table_version += 1
        if ip in self.ips:
            return None
        n = len(self.ips)
        if n >= KVM_LAST_FAULT_COUNT:
            if self.full:
                self.dropped += 1
                return None
            self.full = True
            return n
        self.ips[ip] = n
        return n

    def entry(self, ns: int, n: int, error_code: int, ip: Symbol, offset: int, address: int,
              where: str, obj: str, trace: list[str] | None,
              vm: Kvm | None = None) -> tuple[str, ...]:
        """Append one fault's lines (and the full warning before the first untracked one),
        and its row to the table.

        `ip` and `offset` are the faulting instruction, `where` is `%pS` of the address,
        `obj` mmud's name of the object there and `vm` the VM that took the fault.
        """
        out = []
        if n >= KVM_LAST_FAULT_COUNT:
            out.append(f"KVM isolation: fault tracking buffer is full [{KVM_LAST_FAULT_COUNT}]")
        out.append(f"KVM isolation: page fault #{n} ({error_code}) at {ip.format(offset)} "
                   f"on {address:016x} ({where})")
        if trace is not None:
            out += ["Call Trace:", *(f" {frame}" for frame in trace)]
        key = ip.address + offset
        name = ip.format(offset, with_module=False)
        self.rows[key] = table_row(n, name, address, obj)
        self.counts[key] = 1
        self.table_version += 1
        return self.append(ns, out, vm, Row(n, name, address, obj, key))

    def table_lines(self) -> tuple[str, ...]:
        """kvm/isolation/faults: the header, then one row per logged entry, in entry order."""
        counts = self.counts
        return (TABLE_HEADER, *(f"{row}{counts[ip]}" for ip, row in self.rows.items()))

    def append(self, ns: int, lines: list[str], vm: Kvm | None = None,
               row: Row | None = None) -> tuple[str, ...]:
        prefix = stamp(ns)
        stamped = tuple(prefix + line for line in lines)
        self.lines.extend(stamped)
        self.pending.append(Pending(stamped, vm, row))
        self.version += 1
        return stamped

    def count(self, key: int) -> int:
        """How often the logged IP `key` has faulted so far (1 once the table was cleared)."""
        return self.counts.get(key, 1)

    def take_pending(self) -> list[Pending]:
        out, self.pending = self.pending, []
        return out
