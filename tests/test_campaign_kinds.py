"""The overhead, zap and smoke kinds: a small real job each, through job.execute (the code a
worker's job process runs), then their tables and plots over the rows. The detect kind runs
end to end in tests/test_campaign.py."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib import image

from mmud.campaign import journal
from mmud.campaign.job import OK, execute, job_id
from mmud.campaign.kinds import overhead, smoke, zap


def results(tmp_path: Path, kind: str, jobs: list[dict[str, object]]) -> pd.DataFrame:
    """Run `jobs` here and build their rows as the engine does."""
    entries = {}
    for params in jobs:
        jid = job_id(kind, params)
        r = execute(kind, params, tmp_path / "jobs" / jid)
        assert r["outcome"] == OK, r["message"]
        entries[jid] = journal.Entry(job=jid, kind=kind, params=params, metrics=r["metrics"],
                                     outcome=r["outcome"], message=r["message"],
                                     duration_s=r["duration_s"], worker="here", job_seconds=60.0)
    return journal.frame(tmp_path, entries)


def drawn(path: Path) -> bool:
    png = image.imread(path)
    return png.shape[0] > 300 and png.std() > 0.05


def test_overhead_measures_the_variant_against_the_plain_guest(tmp_path: Path) -> None:
    jobs = overhead.jobs({"audit": ["off", "incremental"], "tracing": [False, True], "mem_mb": [16],
                          "rounds": [2], "steps": [100]}, quick=False)
    df = results(tmp_path, "overhead", jobs).set_index(["audit", "tracing"])
    assert (df["ratio"] > 0).all() and (df["steps_per_s"] > 0).all()
    assert df.loc[("off", False), "audit_runs"] == df.loc[("off", False), "trace_lines"] == 0
    assert df.loc[("incremental", False), "audit_runs"] > 0  # audited at every point
    assert df.loc[("off", True), "trace_lines"] > 0 and df.loc[("off", True), "audit_runs"] == 0
    text = overhead.summarize(df.reset_index())
    assert "| variant | 16 MiB |" in text and "| incremental + tracing |" in text
    (png,) = overhead.plot(df.reset_index(), tmp_path)
    assert png.name == "overhead_ratio.png" and drawn(png)


def test_zap_reports_each_zap_of_the_bench_guest(tmp_path: Path) -> None:
    jobs = zap.jobs({"zap": ["fast", "legacy"], "mem_mb": [16, 32], "contenders": [2],
                     "repeat": [1]}, quick=False)
    df = results(tmp_path, "zap", jobs)
    assert list(df["pages"]) == [4096, 8192, 4096, 8192]  # 4 KiB pages of RAM, all faulted in
    assert (df["zapped"] > 0).all() and (df["total_ms"] > 0).all()
    legacy = df[df["zap"] == "legacy"]
    assert (legacy["stall_ms"] <= legacy["total_ms"]).all()
    text = zap.summarize(df)
    assert "| zap | 16 MiB | 32 MiB |" in text and "| legacy |" in text
    assert [p.name for p in zap.plot(df, tmp_path)] == ["zap_stall.png", "zap_total.png"]
    assert drawn(tmp_path / "zap_stall.png")


def test_smoke_runs_each_configuration(tmp_path: Path) -> None:
    jobs = smoke.jobs({"workload": ["kernel", "none"], "mem_mb": [64], "vcpus": [1],
                       "seed": [1], "steps": [0, 200]}, quick=False)
    df = results(tmp_path, "smoke", jobs).set_index(["workload", "steps"])
    assert df.loc[("kernel", 200), "exits"] > 0 and df.loc[("kernel", 0), "exits"] == 0
    assert df.loc[("none", 200), "steps_run"] == 0  # no workload: no task to step
    text = smoke.summarize(df.reset_index())
    assert "| workload | ok |\n|---|---|\n| kernel | 2 |\n| none | 2 |" in text
    assert f"| kernel | 200 | {df.loc[('kernel', 200), 'exits']} |" in text
    (png,) = smoke.plot(df.reset_index(), tmp_path)
    assert drawn(png)
