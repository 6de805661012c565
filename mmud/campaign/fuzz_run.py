"""Run an operation sequence on a fresh VM and report the first finding.

A finding is one of three things: the audit (at every audit point, no rate limit) reports an
error — or the full audit run after the last operation does; an access disagrees with the
reference walk; or an operation raises anything but the guest faults the model expects
(those never leave `Vcpu.access`). The run stops at the first finding: what follows it is
the damage spreading, not news.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mmud.campaign.fuzz_guest import MEM_MB, Guest, Mismatch, Op
from mmud.machine import VM

AUDIT_EVERY_POINT = {"mmu_audit": "1", "mmu_audit_ratelimit_ms": "0"}


@dataclass(frozen=True)
class Config:
    """What a sequence runs on: the VM and the armed bug ("none" for none)."""

    vcpus: int = 1
    seed: int = 0
    bug: str = "none"
    mem_mb: int = MEM_MB

    def new_vm(self) -> VM:
        vm = VM(mem_mb=self.mem_mb, vcpus=self.vcpus, seed=self.seed, workload=None,
                params=AUDIT_EVERY_POINT)
        vm.inject(self.bug)
        return vm


@dataclass(frozen=True)
class Finding:
    kind: str  # "audit", "mismatch" or "exception"
    op: int  # the operation after which it showed; len(ops) for the closing audit
    message: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def signature(self) -> str:
        """The kind and the message without its numbers (decimal or hex, with or without
        0x): what makes two findings the same finding (the shrinker keeps it, wherever its
        addresses move)."""
        return self.kind + ": " + re.sub(r"(?:0x)?[0-9a-f]*\d[0-9a-f]*", "#", self.message)


@dataclass(frozen=True)
class Outcome:
    ops_run: int
    accesses: int
    audit_errors: int
    audit_runs: int
    finding: Finding | None
    seconds: float


def run_ops(config: Config, ops: Sequence[Op]) -> Outcome:
    """Run `ops` on a fresh VM of `config` until the first finding."""
    start = time.perf_counter()
    vm = config.new_vm()
    guest = Guest(vm)
    stat = vm.stat
    finding = None
    done = 0
    for n, op in enumerate(ops):
        errors = stat["mmu_audit_errors"]
        try:
            guest.apply(op)
        except Mismatch as m:
            finding = Finding("mismatch", n, str(m))
        except Exception as e:  # anything else is a finding, never a crash of the fuzzer
            finding = Finding("exception", n, _describe(e))
        done = n + 1
        if finding is None and stat["mmu_audit_errors"] > errors:
            finding = Finding("audit", n, _first_new_error(vm, stat["mmu_audit_errors"] - errors))
        if finding is not None:
            break
    if finding is None:
        closing = vm.audit()
        if closing:
            finding = Finding("audit", len(ops), closing[0].rstrip("\n"))
    return Outcome(done, guest.accesses, stat["mmu_audit_errors"], stat["mmu_audit_runs"], finding,
                   time.perf_counter() - start)


def _first_new_error(vm: VM, new: int) -> str:
    """The first of the `new` error lines the last operation added to the audit log."""
    errors = [line for line in vm.audit_log() if line.startswith("audit: ")]
    return errors[-new].rstrip("\n") if new <= len(errors) else errors[0].rstrip("\n")


def _describe(e: BaseException) -> str:
    """The exception and, for a task that failed, the one that made it fail."""
    text = f"{type(e).__name__}: {e}"
    cause = e.__cause__
    if cause is not None:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return text
