"""`zap`: zapping every shadow page — fast, slow or legacy — as guest memory grows.

A job is bench/bench_zap.py's measurement, once: a guest of `mem_mb` with all its RAM faulted
in through a 2 MiB-page direct map and `contenders` more vCPUs that take the MMU lock at
every step (INVLPG and a read of a page of their own), then one zap of kind `zap`:

    stall_ms   the longest any vCPU waited for the MMU lock during the zap
    total_ms   the zap from start to end, as the CPU time of its own steps

`fast` and `slow` break the lock when someone waits, so their stall stays flat as memory
grows; `legacy` never breaks, so its stall is its length. Both are CPU times (timings: rerun
does not compare them); `pages` (guest pages faulted in) and `zapped` (shadow pages the zap
freed, from mmu_shadow_zapped) are the same on every run. `repeat` only repeats a job, for
the spread of the timings.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmud.campaign import tables
from mmud.campaign.params import choices, integer, require, text, typed_grid
from mmud.campaign.zap_guest import Guest
from mmud.kvm.mmu.zap import ZAP_KINDS

if TYPE_CHECKING:
    import pandas as pd

AXES = ("zap", "mem_mb", "contenders", "repeat")
TIMINGS = ("stall_ms", "total_ms")


def jobs(axes: dict[str, list], quick: bool) -> list[dict[str, object]]:
    require(axes, AXES)
    choices(axes, "zap", ZAP_KINDS)
    return typed_grid(axes, integers=AXES[1:])


def run(job: dict[str, object], out: Path) -> dict[str, object]:
    guest = Guest(integer(job, "mem_mb"), contenders=integer(job, "contenders"))
    zapped = guest.vm.stats["mmu_shadow_zapped"]
    stall_ms, total_ms = guest.zap(text(job, "zap"))
    return {"stall_ms": stall_ms, "total_ms": total_ms, "pages": guest.pages,
            "zapped": guest.vm.stats["mmu_shadow_zapped"] - zapped}


def summarize(df: pd.DataFrame) -> str:
    ok = df[df["outcome"] == "ok"]
    if ok.empty:
        return "No job ended ok.\n"
    text = ""
    for metric, title in (("stall_ms", "Longest wait for the MMU lock (ms)"),
                          ("total_ms", "The zap from start to end (ms of CPU)")):
        table = ok.pivot_table(index="zap", columns="mem_mb", values=metric, aggfunc="median")
        table.columns = [f"{c} MiB" for c in table.columns]
        text += f"## {title}, median over repeats\n\n" + tables.markdown(table) + "\n"
    return text


def plot(df: pd.DataFrame, out: Path) -> list[Path]:
    from mmud.campaign import plots

    ok = df[df["outcome"] == "ok"]
    if ok.empty:
        return []
    paths = []
    for metric, label in (("stall_ms", "longest wait for mmu_lock (ms)"),
                          ("total_ms", "zap start to end (ms of CPU)")):
        fig, ax = plots.figure()
        for kind, rows in ok.groupby("zap", sort=False):
            per_size = rows.groupby("mem_mb")[metric].median().sort_index()
            ax.plot(per_size.index, per_size.values, marker="o", label=str(kind))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("guest memory (MiB), all of it faulted in")
        ax.set_ylabel(label)
        ax.set_title(f"zap: {metric} vs memory size (median over repeats)")
        ax.legend(title="zap")
        paths.append(plots.save(fig, out / f"zap_{metric.removesuffix('_ms')}.png"))
    return paths
