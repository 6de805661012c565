"""A fingerprint of a fixed set of runs: what a refactoring must leave exactly as it was.

Each run is a seeded VM driven through the Python API only; its fingerprint holds every
statistic, the workload's counters, a hash of guest RAM, a hash of the shadow MMU's
structure (every active page's gfn, role, sptes and links) and the audit's error lines.
`tests/data/fingerprints.json` holds the fingerprints of the runs below as they were
recorded; `test_determinism.py` compares today's against it. A change that alters the
simulation on purpose (a fidelity fix) records them again:

    python -m tests.fingerprint --write
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import structlog

import mmud
from mmud.sched import TaskFailed

BASELINE = Path(__file__).with_name("data") / "fingerprints.json"

# name -> (VM arguments, load-time parameters, steps)
RUNS: dict[str, tuple[dict[str, object], dict[str, str], int]] = {
    "kernel-2cpu": (dict(vcpus=2, seed=11, workload="kernel"), {"address_space_isolation": "1"}, 15000),
    "kernel-3cpu-noiso": (dict(vcpus=3, seed=5, workload="kernel"),
                          {"address_space_isolation": "0"}, 15000),
    "stream-2cpu": (dict(vcpus=2, seed=3, workload="stream"), {}, 15000),
    "churn-2cpu": (dict(vcpus=2, seed=9, workload="memslot_churn"), {"address_space_isolation": "1"},
                   15000),
    "kernel-audit-incremental": (dict(vcpus=2, seed=4, workload="kernel"),
                                 {"mmu_audit": "1", "mmu_audit_ratelimit_ms": "0",
                                  "mmu_audit_scope": "incremental"}, 5000),
    "kernel-audit-full-ratelimited": (dict(vcpus=2, seed=6, workload="kernel"),
                                      {"mmu_audit": "1"}, 5000),
}
# Runs with an armed bug: the audit's error lines must not change either.
BUG_RUNS: dict[str, tuple[str, str]] = {
    "bug-wrong_pfn": ("wrong_pfn", "incremental"),
    "bug-sync_skipped": ("sync_skipped", "incremental"),
    "bug-rmap_add_skipped": ("rmap_add_skipped", "full"),
}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


def mmu_digest(vm: mmud.VM) -> str:
    """The shadow MMU's structure: pages oldest first, each with its sptes and links."""
    h = hashlib.sha256()
    for sp in vm.mmu.active_mmu_pages:
        h.update(repr((sp.gfn, sp.role, sp.unsync, sp.unsync_children, sp.root_count,
                       sorted(sp.parent_ptes))).encode())
        h.update(sp.spt.tobytes())
    return h.hexdigest()[:24]


def memory_digest(vm: mmud.VM) -> str:
    h = hashlib.sha256()
    for slot in sorted(vm.memslots, key=lambda s: s.id):
        h.update(repr((slot.id, slot.base_gfn, slot.npages)).encode())
        h.update(slot.backing.array.tobytes())
    return h.hexdigest()[:24]


def fingerprint(vm: mmud.VM, audit_lines: list[str], crash: str | None) -> dict[str, object]:
    return {
        "steps": vm.steps,
        "crash": crash,
        "stats": dict(vm.stats),
        "counters": dict(vm.workload.counters) if vm.workload else {},
        "memory": memory_digest(vm),
        "mmu": mmu_digest(vm),
        "audit": _digest("".join(audit_lines).encode()),
        "audit_lines": len(audit_lines),
    }


def run_one(name: str) -> dict[str, object]:
    if name in BUG_RUNS:
        bug, scope = BUG_RUNS[name]
        params = mmud.Params({"mmu_audit": "1", "mmu_audit_ratelimit_ms": "0",
                              "mmu_audit_scope": scope, "address_space_isolation": "0"})
        vm = mmud.VM(vcpus=2, seed=2, workload="kernel", params=params)
        vm.step(300)
        vm.inject(bug)
        steps = 300
    else:
        args, load, steps = RUNS[name]
        vm = mmud.VM(params=mmud.Params(load), **args)
    crash = None
    try:
        vm.step(steps)
    except TaskFailed as e:  # an armed bug may crash the guest: where it does is part of the run
        crash = str(e)
    return fingerprint(vm, vm.audit_log(), crash)


def all_names() -> list[str]:
    return [*RUNS, *BUG_RUNS]


def main(argv: list[str]) -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))
    prints = {name: run_one(name) for name in all_names()}
    if "--write" in argv:
        BASELINE.write_text(json.dumps(prints, indent=1, sort_keys=True) + "\n")
        print(f"wrote {BASELINE}")
    else:
        print(json.dumps(prints, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
