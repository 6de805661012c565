"""`smoke`: build a VM and run it for N steps — does every configuration boot and run?

Axes: `workload` (a guest or host workload, or "none"), `mem_mb`, `vcpus`, `seed`, `steps`.
Metrics: the steps run and the VM's exits, fixed page faults and audit errors. Across many
seeds and configurations it finds the one that crashes the guest (outcome guest_crash); with
`steps = 0` a job does almost nothing, which makes it the engine's own yardstick
(bench/bench_campaign.py measures a job's round trip and the speed-up of workers with it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import mmud
from mmud.campaign import tables
from mmud.campaign.params import integer, require, text, typed_grid

if TYPE_CHECKING:
    import pandas as pd

AXES = ("workload", "mem_mb", "vcpus", "seed", "steps")


def jobs(axes: dict[str, list], quick: bool) -> list[dict[str, object]]:
    require(axes, AXES)
    return typed_grid(axes, integers=AXES[1:], texts=("workload",))


def run(job: dict[str, object], out: Path) -> dict[str, object]:
    workload = text(job, "workload")
    vm = mmud.VM(mem_mb=integer(job, "mem_mb"), vcpus=integer(job, "vcpus"), seed=integer(job, "seed"),
                 workload=None if workload == "none" else workload)
    steps = vm.step(integer(job, "steps"))
    stats = vm.stats
    return {"steps_run": steps, "exits": stats["exits"], "pf_fixed": stats["pf_fixed"],
            "audit_errors": stats["mmu_audit_errors"]}


def summarize(df: pd.DataFrame) -> str:
    counts = df.pivot_table(index="workload", columns="outcome", values="job", aggfunc="count",
                            fill_value=0)
    ok = df[df["outcome"] == "ok"]
    text = "## Jobs by workload and outcome\n\n" + tables.markdown(counts)
    if not ok.empty:
        exits = ok.groupby(["workload", "steps"])["exits"].median().to_frame("median exits")
        text += "\n## Exits per run (median over the other axes)\n\n" + tables.markdown(exits)
    return text


def plot(df: pd.DataFrame, out: Path) -> list[Path]:
    from mmud.campaign import plots

    ok = df[df["outcome"] == "ok"]
    if ok.empty:
        return []
    fig, ax = plots.figure()
    for workload, rows in ok.groupby("workload"):
        per_steps = rows.groupby("steps")["exits"].median()
        ax.plot(per_steps.index, per_steps.values, marker="o", label=str(workload))
    ax.set_xlabel("steps run")
    ax.set_ylabel("VM exits (median over seeds and sizes)")
    ax.set_title("smoke: exits per run")
    ax.legend()
    return [plots.save(fig, out / "smoke_exits.png")]
