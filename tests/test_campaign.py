"""`mmud campaign` end to end on real Dask clusters: a LocalCluster of worker processes, and a
`dask scheduler` with `dask worker` processes started here on 127.0.0.1.

The jobs are real simulation jobs (the detect and smoke kinds); failures are real too — an
unknown workload raises in the job, a job outlives its limit and is killed, a worker process
is SIGKILLed mid-campaign, Ctrl-C is a real SIGINT to the campaign's process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psutil
import pytest
from matplotlib import image

from mmud import cli
from mmud.campaign import journal

SMALL_DETECT = """
kind = "detect"
[axes]
bug = ["wrong_pfn", "sync_skipped"]
mode = ["ratelimited", "incremental"]
seed = [1, 2]
budget_steps = [3000]
mem_mb = [64]
vcpus = [2]
[limits]
job_seconds = 60
"""
JOBS = 8


def spec_file(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / journal.JOURNAL).read_text().splitlines()]


def check_detect_results(out: Path) -> pd.DataFrame:
    """What the small detect campaign must leave: a row per job with its axes, metrics and
    outcome, a summary with the kind's table, and the box plot."""
    df = pd.read_parquet(out / journal.RESULTS)
    assert len(df) == JOBS and df["job"].is_unique
    for column in ("job", "bug", "mode", "seed", "detect_ops", "reported", "outcome", "message",
                   "duration_s", "worker", "rerun"):
        assert column in df.columns
    assert set(df["outcome"]) <= {"ok", "guest_crash"}
    incremental = df[df["mode"] == "incremental"]
    assert (incremental["outcome"] == "ok").all() and incremental["reported"].astype(bool).all()
    assert (incremental["detect_ops"] > 0).all()
    assert (df["duration_s"] > 0).all()
    assert df["rerun"].str.fullmatch(rf"mmud campaign rerun {out.resolve()} [0-9a-f]{{12}}").all()
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Campaign `detect`")
    assert f"{JOBS} jobs: ok {(df['outcome'] == 'ok').sum()}" in summary
    assert "| bug | mode | seeds | reported | not reported | crashed |" in summary
    for bug in ("wrong_pfn", "sync_skipped"):
        median = incremental[incremental["bug"] == bug]["detect_ops"].median()
        assert f"| {bug} | incremental | 2 | 2 | 0 | 0 | 0 | {median:.4g} |" in summary
    assert "![detect_ops](detect_ops.png)" in summary
    png = image.imread(out / "detect_ops.png")
    assert png.shape[0] > 300 and png.shape[1] > 500 and png.std() > 0.05  # a drawing
    return df


def test_local_cluster_runs_a_detect_campaign_and_reruns_and_resumes(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    spec = spec_file(tmp_path, SMALL_DETECT)
    assert cli.main(["campaign", "run", str(spec), "--workers", "2", "--out", str(out)]) == 0
    err = capfd.readouterr().err
    assert f"{JOBS} jobs to run on 2 workers" in err and f"{JOBS}/{JOBS}" in err  # the progress bar
    df = check_detect_results(out)
    assert df["worker"].nunique() == 2

    # rerun: the same job alone, here, gives the row the campaign recorded
    row = df[df["mode"] == "incremental"].iloc[0]
    ops = int(row["detect_ops"])  # a float column: the crashed jobs have none
    assert cli.main(["campaign", "rerun", str(out), row["job"][:8]]) == 0
    printed = capfd.readouterr()
    assert f"detect_ops    {ops}\n" in printed.out and "local (rerun)" in printed.out
    assert "reproduces the journal's row" in printed.err
    entries = lines(out)
    tampered = next(e for e in entries if e["job"] == row["job"])
    tampered["metrics"]["detect_ops"] += 1
    (out / journal.JOURNAL).write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert cli.main(["campaign", "rerun", str(out), row["job"]]) == 1
    assert f"detect_ops: recorded {ops + 1}, now {ops}" in capfd.readouterr().out

    # a second run into the same directory must say --resume; --resume runs what is missing
    assert cli.main(["campaign", "run", str(spec), "--workers", "2", "--out", str(out)]) == 2
    assert "--resume" in capfd.readouterr().err
    kept = (out / journal.JOURNAL).read_text().splitlines()[:5]
    (out / journal.JOURNAL).write_text("\n".join(kept) + "\n")
    assert cli.main(["campaign", "run", str(spec), "--workers", "2", "--out", str(out),
                     "--resume"]) == 0
    assert "3 jobs to run (5 already in the journal)" in capfd.readouterr().err
    after = (out / journal.JOURNAL).read_text().splitlines()
    assert after[:5] == kept and len(after) == JOBS
    check_detect_results(out)


def smoke_spec(tmp_path: Path, workloads: str, seeds: int, steps: str, job_seconds: int) -> Path:
    return spec_file(tmp_path, f"""
        kind = "smoke"
        [axes]
        workload = [{workloads}]
        mem_mb = [64]
        vcpus = [1]
        seed = [{", ".join(str(s) for s in range(1, seeds + 1))}]
        steps = [{steps}]
        [limits]
        job_seconds = {job_seconds}
        """, "smoke.toml")


def campaign(*args: str) -> subprocess.Popen[str]:
    """`mmud campaign …` in its own session: a Ctrl-C reaches its whole process group."""
    return subprocess.Popen([sys.executable, "-m", "mmud", "campaign", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def job_processes(root: int) -> list[psutil.Process]:
    """The job processes under the campaign process `root` (its workers' children)."""
    found = []
    for p in psutil.Process(root).children(recursive=True):
        try:
            if "mmud.campaign.jobproc" in p.cmdline():
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def journaled(out: Path) -> int:
    path = out / journal.JOURNAL
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_raising_job_a_timeout_and_a_killed_worker_are_recorded(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # per seed: a kernel job of 1,000 steps (ok), one of 10**9 (killed at the 6 s limit), and
    # two that raise (unknown workload)
    spec = smoke_spec(tmp_path, '"kernel", "bogus"', 2, "1000, 1000000000", 6)
    proc = campaign("run", str(spec), "--workers", "2", "--out", str(out))
    try:
        victim = wait_for(lambda: journaled(out) >= 1 and job_processes(proc.pid), 60,
                          "a job done")[0]
        victim.parent().send_signal(signal.SIGKILL)  # its worker, in the middle of a job
        victim.wait(timeout=5)  # the orphaned job process notices and exits
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    df = pd.read_parquet(out / journal.RESULTS)
    assert len(df) == 8 and df["job"].is_unique
    short = df[(df["workload"] == "kernel") & (df["steps"] == 1000)]
    assert (short["outcome"] == "ok").all() and (short["steps_run"] == 1000).all(), short
    long = df[(df["workload"] == "kernel") & (df["steps"] > 1000)]
    assert (long["outcome"] == "timeout").all(), long[["outcome", "message"]]
    assert long["message"].str.contains("killed at the time limit of 6 s").all()
    assert (long["duration_s"] >= 6).all()
    bogus = df[df["workload"] == "bogus"]
    assert (bogus["outcome"] == "error").all()
    assert bogus["message"].str.contains("unknown workload 'bogus'").all()
    summary = (out / "summary.md").read_text()
    assert "8 jobs: ok 2, guest_crash 0, timeout 2, error 4" in summary
    assert "## Jobs that did not end ok (6)" in summary


def test_a_job_whose_worker_dies_twice_is_an_error(tmp_path: Path) -> None:
    """allowed-failures 1: the job goes to a second worker, and when that one dies too it is
    recorded as an error (with Dask's default of 3 it would run a third time)."""
    out = tmp_path / "out"
    spec = smoke_spec(tmp_path, '"kernel"', 1, "1000000000", 120)
    proc = campaign("run", str(spec), "--workers", "1", "--out", str(out))
    try:
        killed: list[int] = []
        for _ in range(2):
            victim = wait_for(lambda: [p for p in job_processes(proc.pid) if p.pid not in killed],
                              60, "the job running")[0]
            killed.append(victim.pid)
            victim.parent().send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    (entry,) = lines(out)
    assert entry["outcome"] == "error" and entry["message"].startswith("KilledWorker: ")
    assert "1 jobs: ok 0, guest_crash 0, timeout 0, error 1" in (out / "summary.md").read_text()


def test_sigint_stops_the_campaign_with_the_results_so_far(tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = smoke_spec(tmp_path, '"kernel"', 10, "1500", 60)
    proc = campaign("run", str(spec), "--workers", "2", "--out", str(out))
    try:
        wait_for(lambda: journaled(out) >= 2, 60, "two jobs done")
        workers = job_processes(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    done = journaled(out)
    assert 2 <= done < 10
    df = pd.read_parquet(out / journal.RESULTS)
    assert len(df) == done and set(df["job"]) == {e["job"] for e in lines(out)}
    assert (df["outcome"] == "ok").all()
    assert "was stopped (SIGINT)" in (out / "summary.md").read_text()
    psutil.wait_procs(workers, timeout=10)
    assert not [p for p in workers if p.is_running()]


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A `dask scheduler` and two `dask worker` processes on 127.0.0.1 (allowed-failures 1, as
    docs/campaigns.md tells; workers without a nanny, so that killing them leaves nothing
    behind); yields the scheduler's address and the scheduler file."""
    dask = str(Path(sys.executable).with_name("dask"))
    file = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--dashboard-address", ":0", "--scheduler-file", str(file)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_for(lambda: file.exists() and file.stat().st_size, 30, "the scheduler file")
        for _ in range(2):
            procs.append(start_worker(file))
        address = json.loads(file.read_text())["address"]
        wait_for(lambda: workers_of(address) == 2, 60, "two workers")
        yield address, file
    finally:
        for p in procs + EXTRA_WORKERS:  # throwaway processes: no graceful close to wait for
            p.kill()
            p.wait()
        EXTRA_WORKERS.clear()


EXTRA_WORKERS: list[subprocess.Popen[bytes]] = []


def start_worker(file: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    dask = str(Path(sys.executable).with_name("dask"))
    return subprocess.Popen([dask, "worker", "--scheduler-file", str(file), "--host", "127.0.0.1",
                             "--nthreads", "1", "--no-nanny", "--no-dashboard"], env=env or dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def workers_of(address: str) -> int:
    from distributed import Client

    with Client(address, timeout=10) as client:
        return len(client.scheduler_info()["workers"])


def test_a_dask_scheduler_and_workers_run_it_and_refuse_other_versions(
        tmp_path: Path, dask_cluster: tuple[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    address, file = dask_cluster
    out = tmp_path / "out"
    spec = spec_file(tmp_path, SMALL_DETECT)
    assert cli.main(["campaign", "run", str(spec), "--scheduler", address, "--out", str(out)]) == 0
    err = capfd.readouterr().err
    assert f"{JOBS} jobs to run on 2 workers" in err and "allowed-failures" not in err
    df = check_detect_results(out)
    from distributed import Client

    with Client(address, timeout=10) as client:
        assert set(df["worker"]) == set(client.scheduler_info()["workers"])

    # a worker with another mmud installed: a distribution of version 99.0 found first
    dist = tmp_path / "other" / "mmud-99.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mmud\nVersion: 99.0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(dist.parent), os.environ.get("PYTHONPATH", "")]))}
    EXTRA_WORKERS.append(start_worker(file, env))
    wait_for(lambda: workers_of(address) == 3, 60, "the third worker")
    assert cli.main(["campaign", "run", str(spec), "--scheduler", address,
                     "--out", str(tmp_path / "refused")]) == 2
    err = capfd.readouterr().err
    assert "refusing to run on a cluster whose versions differ" in err
    assert "mmud 99.0 (client: " in err and err.count("\n  worker tcp://127.0.0.1:") == 1
    assert not (tmp_path / "refused" / journal.JOURNAL).exists()
