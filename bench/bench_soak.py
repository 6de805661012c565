"""A soak of the running daemon: many clients changing everything at once.

Eight client threads, for 60 s (`--quick`: 8 s), against one `python -m mmud run`: each
repeatedly creates and destroys a VM of its own through `vms`, restarts it, arms and disarms
bugs in it, adds and deletes a memslot of its own in vm0, migrates its VM (the destination
is replaced each time), and reads statistics, states and statuses in between.

- `soak_ops`: file operations done (an open + read or write + close is one).
- `soak_errors_unexpected`: operations that failed with an errno the operation's kernel
  semantics do not allow (each operation lists the errnos it may meet: EEXIST for a name
  in use, EBUSY for a migration under way, …); goal 0.
- `soak_hangs_over_1s`: operations that took longer than a second; goal 0.
- `soak_rss_growth_mb[main]`, `soak_rss_growth_mb[sim]`: growth of each process's resident
  set from 1/3 of the run to its end (20 s to 60 s); goal ≤ 10.
"""

from __future__ import annotations

import errno
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench._common import figure, put
from bench.bench_daemon import running_daemon

CLIENTS = 8
HANG_SECONDS = 1.0
BUGS = ("wrong_pfn", "rmap_add_skipped", "sync_skipped", "pte_write_ignored")


@dataclass
class Tally:
    ops: int = 0
    unexpected: list[str] = field(default_factory=list)
    hangs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str, seconds: float, error: OSError | None, allowed: frozenset[int]) -> None:
        with self.lock:
            self.ops += 1
            if seconds > HANG_SECONDS:
                self.hangs += 1
            if error is not None and error.errno not in allowed:
                self.unexpected.append(f"{what}: {error!r}")


def _op(tally: Tally, what: str, allowed: frozenset[int], fn: Callable[..., object], *args: object) -> None:
    """Run fn(*args) as one timed operation; an OSError with an errno in `allowed` is
    something the file may answer."""
    t0 = time.monotonic()
    try:
        fn(*args)
        error = None
    except OSError as e:
        error = e
    tally.count(what, time.monotonic() - t0, error, allowed)


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1])


def _sim_pid(mnt: Path) -> int:
    return int(re.search(rb"^pid:\s+(\d+)", _read(mnt / "vm0/status"), re.M)[1])


def _client(mnt: Path, k: int, tally: Tally, stop: float) -> None:
    rng = random.Random(k)
    name = f"vm{10 + k}"
    slot = 20 + k
    gpa = (1 << 36) + k * (1 << 24)
    # Any operation on the client's own VM may meet it destroyed or not yet created, and a
    # migration, restart or bug may leave it paused or crashed: those errnos are the files'.
    vm_gone = frozenset({errno.ENOENT})
    none: frozenset[int] = frozenset()
    while time.monotonic() < stop:
        action = rng.randrange(9)
        if action == 0:
            _op(tally, "create", frozenset({errno.EEXIST}), put, mnt / "vms",
                f"create {name} mem=16M seed={k}\n")
        elif action == 1:
            _op(tally, "destroy", vm_gone, put, mnt / "vms", f"destroy {name}\n")
        elif action == 2:
            _op(tally, "restart", vm_gone, put, mnt / name / "state", "restart\n")
        elif action == 3:
            _op(tally, "inject", vm_gone, put, mnt / name / "inject", f"{rng.choice(BUGS)}\n")
            _op(tally, "disarm", vm_gone, put, mnt / name / "inject", "none\n")
        elif action == 4:
            _op(tally, "memslot add", frozenset({errno.EEXIST}), put, mnt / "vm0/memslots",
                f"add {slot} {gpa:#x} 0x10000\n")
            _op(tally, "memslot delete", frozenset({errno.EINVAL}), put, mnt / "vm0/memslots",
                f"delete {slot}\n")
        elif action == 5:
            # A migration needs a running source; one under way is EBUSY.
            _op(tally, "run", vm_gone | {errno.EINVAL}, put, mnt / name / "state", "run\n")
            _op(tally, "migrate", vm_gone | {errno.EBUSY}, put, mnt / name / "migrate", "start\n")
        else:
            rel = rng.choice(["kvm/pf_fixed", "kvm/exits", "vm0/status", "vm0/state", "vms",
                              f"{name}/status", "kvm/mmu_shadow_zapped", "parameters/mmu_audit"])
            _op(tally, f"read {rel}", vm_gone if rel.startswith(name) else none, _read, mnt / rel)


def run(quick: bool = False) -> None:
    duration = 8.0 if quick else 60.0
    with running_daemon() as (mnt, _, main_pid):
        sim_pid = _sim_pid(mnt)
        tally = Tally()
        start = time.monotonic()
        stop = start + duration
        threads = [threading.Thread(target=_client, args=(mnt, k, tally, stop)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(duration / 3)
        rss0 = {"main": _rss_kib(main_pid), "sim": _rss_kib(sim_pid)}
        for t in threads:
            t.join()
        rss1 = {"main": _rss_kib(main_pid), "sim": _rss_kib(sim_pid)}
    figure("soak_ops", tally.ops, "ops")
    figure("soak_errors_unexpected", len(tally.unexpected), "errors")
    for line in tally.unexpected[:10]:
        print(f"  unexpected: {line}")
    figure("soak_hangs_over_1s", tally.hangs, "ops")
    for proc in ("main", "sim"):
        figure(f"soak_rss_growth_mb[{proc}]", (rss1[proc] - rss0[proc]) / 1024, "MB")
