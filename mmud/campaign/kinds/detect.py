"""`detect`: how soon each audit mode catches each injected bug, across seeds.

A job boots the `kernel` workload (`mem_mb`, `vcpus`, `seed`), runs 500 steps, arms `bug`
and steps until the audit first reports or `budget_steps` have run. Its metric `detect_ops`
is the MMU operations from arming to the report: VM exits, where every page fault, trapped
write, CR3 load and INVLPG is one. The modes (`mode`):

    ratelimited   the full audit with the kernel's rate limit (10 runs per 5 s)
    every         the full audit at every audit point
    incremental   the audit of what changed since the last run, at every point

The dirty-log bugs live in the harvest: for them slot 0 is logged and a host task harvests it,
a bitmap word per step with the vCPUs running in between, every 200 steps. A bug that breaks
the guest before anything reports it ends the job as guest_crash. Everything is counted in
steps and simulated time, so a job's metrics depend on its parameters only.

bench/bench_audit.py prints the same figure (`detect_ops[<bug>,<mode>]`) for one seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mmud
from mmud.campaign import tables
from mmud.campaign.params import choices, integer, require, text, typed_grid
from mmud.kvm.dirty_log import kvm_get_dirty_log_protect
from mmud.sched import TaskFailed
from mmud.uapi.bugs import BUGS

if TYPE_CHECKING:
    import pandas as pd

MODES: dict[str, dict[str, str]] = {
    "ratelimited": {"mmu_audit": "1"},
    "every": {"mmu_audit": "1", "mmu_audit_ratelimit_ms": "0"},
    "incremental": {
        "mmu_audit": "1",
        "mmu_audit_ratelimit_ms": "0",
        "mmu_audit_scope": "incremental",
    },
}
AXES = ("bug", "mode", "seed", "budget_steps", "mem_mb", "vcpus")
WARMUP_STEPS = 500
HARVEST_PAUSE_STEPS = 200
STEPS_PER_LOOK = 10


def harvester(vm: mmud.VM) -> Iterator[None]:
    """Userspace's dirty-log thread: KVM_GET_DIRTY_LOG of slot 0 a bitmap word at a time, so
    that the vCPUs run inside the harvest, then a pause of 200 steps; over and over."""
    while True:
        yield from kvm_get_dirty_log_protect(vm, 0, words_per_step=1)
        for _ in range(HARVEST_PAUSE_STEPS):
            yield


@dataclass(frozen=True)
class Detection:
    ops: int  # MMU operations from arming the bug to the report (or to the stop)
    steps: int  # scheduler steps from arming to the report (or to the stop)
    reported: bool
    crashed: bool  # the guest crashed before the audit reported


def detect(bug: str, mode: str, seed: int, budget_steps: int, *, mem_mb: int = 64,
           vcpus: int = 2, give_up: Callable[[], bool] | None = None) -> Detection:
    """Arm `bug` in a running kernel guest and step until the audit reports it, the budget is
    spent, or `give_up()` says so (the benchmark bounds wall time with it; a campaign job
    leaves that to the engine's time limit, so that its metrics depend on its parameters)."""
    vm = mmud.VM(mem_mb=mem_mb, vcpus=vcpus, seed=seed, workload="kernel", params=MODES[mode])
    if bug.startswith("dirty_"):  # they live in the harvest: log slot 0, harvest it
        vm.log_dirty_pages(0)
        vm.scheduler.add("harvest", harvester(vm))
    vm.step(WARMUP_STEPS)
    exits = vm.stats["exits"]
    vm.inject(bug)
    steps, crashed = 0, False
    try:
        while (not vm.stats["mmu_audit_errors"] and steps < budget_steps
               and not (give_up and give_up())):
            steps += vm.step(STEPS_PER_LOOK)
    except TaskFailed:
        crashed = True
    reported = bool(vm.stats["mmu_audit_errors"])
    return Detection(vm.stats["exits"] - exits, steps, reported, crashed and not reported)


def jobs(axes: dict[str, list], quick: bool) -> list[dict[str, object]]:
    require(axes, AXES)
    choices(axes, "bug", (b.name for b in BUGS))
    choices(axes, "mode", MODES)
    return typed_grid(axes, integers=AXES[2:])


def run(job: dict[str, object], out: Path) -> dict[str, object]:
    d = detect(text(job, "bug"), text(job, "mode"), integer(job, "seed"),
               integer(job, "budget_steps"), mem_mb=integer(job, "mem_mb"),
               vcpus=integer(job, "vcpus"))
    if d.crashed:
        raise TaskFailed(f"the guest crashed {d.ops} operations after the bug was armed, "
                         "before the audit reported it")
    return {"detect_ops": d.ops, "detect_steps": d.steps, "reported": d.reported}


def summarize(df: pd.DataFrame) -> str:
    """Per bug and mode: how many seeds reported, crashed, ran out of budget or time, and the
    distribution of detect_ops over the seeds that reported."""
    groups = df.groupby(["bug", "mode"], sort=False)
    table = groups.apply(lambda g: _row(g), include_groups=False)
    text = ("## detect_ops: MMU operations from arming the bug to the audit's first report\n\n"
            "Over the seeds that reported; `not reported` ran out of budget_steps, `crashed` "
            "broke the guest first, `timeout`/`error` did not finish.\n\n")
    return text + tables.markdown(table)


def _row(g: pd.DataFrame) -> pd.Series:
    import pandas as pd

    ok = g[g["outcome"] == "ok"]
    hit = ok[ok["reported"].astype(bool)]["detect_ops"]
    return pd.Series({
        "seeds": len(g),
        "reported": len(hit),
        "not reported": len(ok) - len(hit),
        "crashed": int((g["outcome"] == "guest_crash").sum()),
        "timeout/error": int(g["outcome"].isin(["timeout", "error"]).sum()),
        "median": float(hit.median()) if len(hit) else float("nan"),
        "min": float(hit.min()) if len(hit) else float("nan"),
        "max": float(hit.max()) if len(hit) else float("nan"),
    })


def plot(df: pd.DataFrame, out: Path) -> list[Path]:
    """One box per bug and mode over the seeds that reported, on a log scale; the jobs that
    ran out of budget first are open triangles at the operations they ran (lower bounds)."""
    from mmud.campaign import plots

    ok = df[df["outcome"] == "ok"]
    if ok.empty:
        return []
    reported = ok["reported"].astype(bool)
    bugs = list(dict.fromkeys(df["bug"]))
    modes = [m for m in MODES if m in set(df["mode"])]
    fig, ax = plots.figure(max(7.0, 1.1 * len(bugs)), 5.0)
    width = 0.8 / len(modes)
    colors = ("tab:blue", "tab:orange", "tab:green")
    for k, mode in enumerate(modes):
        color = colors[k % len(colors)]
        data, positions = [], []
        for i, bug in enumerate(bugs):
            x = i + (k - (len(modes) - 1) / 2) * width
            mine = (ok["bug"] == bug) & (ok["mode"] == mode)
            hit = ok[mine & reported]["detect_ops"]
            if len(hit):
                data.append(hit.to_numpy())
                positions.append(x)
            missed = ok[mine & ~reported]["detect_ops"]
            ax.scatter([x] * len(missed), missed, marker="^", facecolors="none", edgecolors=color)
        if data:
            ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True,
                       boxprops={"facecolor": color, "alpha": 0.6},
                       medianprops={"color": "black"}, flierprops={"markersize": 3})
        ax.plot([], [], color=color, linewidth=8, alpha=0.6, label=mode)
    ax.scatter([], [], marker="^", facecolors="none", edgecolors="gray",
               label="not reported within\nbudget_steps (≥)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(bugs)), bugs, rotation=35, ha="right")
    ax.set_xlim(-0.6, len(bugs) - 0.4)
    ax.set_ylabel("detect_ops (MMU operations to the first report)")
    ax.set_title("detect: operations until the audit reports each bug")
    ax.legend(title="audit mode", fontsize="small")
    return [plots.save(fig, out / "detect_ops.png")]
