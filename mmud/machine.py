"""A runnable VM: the KVM side (mmud.kvm.vm.Kvm) plus a guest workload on every vCPU.

This is `mmud.VM`. It sits above both the simulated KVM and the guest workloads, and owns the
seeded scheduler that interleaves the vCPUs with host tasks (mmud.host, and the lock breaks
of a fast zap of all shadow pages).
"""

from __future__ import annotations

from collections.abc import Mapping

from mmud.guest import WORKLOADS
from mmud.host import HOST_WORKLOADS
from mmud.kvm.mmu.zap import ZapRun
from mmud.uapi.params import Params
from mmud.kvm.module import KvmModule
from mmud.kvm.vm import Kvm
from mmud.sched import Scheduler

# Simulated time per scheduler step: the clock of rate limits and log stamps, so that they,
# like everything else, depend on the seed and not on how fast the host runs.
STEP_NS = 20_000


class VM(Kvm):
    def __init__(
        self,
        mem_mb: int = 64,
        vcpus: int = 1,
        seed: int = 0,
        workload: str | None = None,
        params: Params | Mapping[str, str | None] | None = None,
        module: KvmModule | None = None,
    ) -> None:
        super().__init__(mem_mb=mem_mb, vcpus=vcpus, params=params, module=module)
        known = [*WORKLOADS, *HOST_WORKLOADS]
        if workload is not None and workload not in known:
            raise ValueError(f"unknown workload {workload!r} (known: {', '.join(known)})")
        self.seed = seed
        self.steps = 0
        self.workload_name = workload
        self.scheduler = Scheduler(seed)
        # A host workload runs a guest workload on the vCPUs and a host task beside them.
        guest, host_task = HOST_WORKLOADS.get(workload or "", (workload, None))
        self.workload = WORKLOADS[guest](self, seed) if guest else None
        if self.workload is not None:
            for vcpu in self.vcpus:
                self.scheduler.add(f"vcpu{vcpu.index}", self.workload.task(vcpu))
        if host_task is not None:
            self.scheduler.add(str(workload), host_task(self, seed))

    def step(self, n: int = 1) -> int:
        """Run n scheduler steps (fewer if every task ended); returns the steps run.

        A step that raises (a guest crash) is not counted; the ones before it are, so
        `steps` after a crash is exactly the steps completed."""
        done = 0
        step = self.scheduler.step
        try:
            while done < n and step():
                done += 1
                self.clock_ns += STEP_NS
        finally:
            self.steps += done
        if self.isolation: self.isolation.exit()  # KVM_RUN returns to userspace
        return done

    def current_task(self) -> str | None:
        scheduler = self.__dict__.get("scheduler")
        return None if scheduler is None else scheduler.current

    def preempt(self) -> None:
        """A vCPU loses its CPU inside a step: the scheduler runs other tasks meanwhile."""
        done = self.scheduler.preempt()
        self.clock_ns += done * STEP_NS
        self.steps += done

    def run_lock_breaks(self, run: ZapRun) -> None:
        """A zap of every shadow page in a running VM is a host task: each of its scheduler
        steps is one page's work with the MMU lock held, the vCPUs' steps run beside them,
        and a vCPU that needs the lock waits for the zap's next lock break (if it takes one).
        need_resched counts the zap's steps while another task is there to run."""
        if not len(self.scheduler):
            super().run_lock_breaks(run)
            return
        scheduler = self.scheduler
        self.scheduler.add(run.task_name, run.task(lambda: len(scheduler) > 1))
