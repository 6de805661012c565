"""The `fuzz` campaign kind (docs/fuzzing.md): random guest operations on a real VM, every
access judged by the SDM reference walk, the audit at every point.

Each armed bug is found within 20,000 operations and its shrunk sequence still shows it
(and does not without the bug); with no bug armed, 200,000 operations find nothing; the
same job gives the same result; the shrinker's output is shorter and still fails.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmud.campaign.fuzz_gen import Generator
from mmud.campaign.fuzz_guest import FRAMES_4K, VAS, Guest, Mismatch, P, U, W, idx
from mmud.campaign.fuzz_run import Config, run_ops
from mmud.campaign.fuzz_shrink import ddmin, shrink
from mmud.campaign.kinds import fuzz
from mmud.uapi.bugs import BUGS

FIND_WITHIN = 20_000
SHRINK_RUNS = 12  # enough to show shrinking; the campaign default is larger
TIMINGS = set(fuzz.TIMINGS) | {"finding_file"}


def _job(**kw: object) -> dict[str, object]:
    return {**fuzz.DEFAULTS, "seed": 0, "vcpus": 3, **kw}


@pytest.mark.parametrize("bug", [b.name for b in BUGS])
def test_every_armed_bug_is_found_and_the_shrunk_sequence_shows_it(bug, tmp_path):
    metrics = fuzz.run(_job(bug=bug, ops=FIND_WITHIN, shrink=SHRINK_RUNS), tmp_path)
    assert metrics["findings"] == 1, metrics
    assert isinstance(metrics["first_finding_op"], int) and metrics["first_finding_op"] < FIND_WITHIN
    record = json.loads((tmp_path / fuzz.FINDING_FILE).read_text())
    assert record["replay"] == fuzz.replay_command(tmp_path / fuzz.FINDING_FILE)
    assert len(record["ops"]) == metrics["shrunk_ops"] <= record["original_ops"]
    now, saved = fuzz.replay(tmp_path / fuzz.FINDING_FILE)
    assert now is not None and now.signature == saved.signature
    # The bug is what the sequence shows: without it, the same operations find nothing.
    assert run_ops(Config(**{**record["config"], "bug": "none"}), record["ops"]).finding is None


SPEC_200K = """
kind = "fuzz"
[axes]
bug = ["none"]
vcpus = [1, 2, 3, 4]
seed = [11, 12]
ops = [25000]
[limits]
job_seconds = 600
"""


def test_no_bug_armed_finds_nothing_in_200000_operations(tmp_path):
    """Eight jobs of 25,000 operations (every vCPU count, two seeds) on a local cluster of
    two workers, through `mmud campaign run`: every job runs to its end with no finding."""
    import pandas as pd

    from mmud.campaign import journal

    spec = tmp_path / "fuzz200k.toml"
    spec.write_text(SPEC_200K)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "mmud", "campaign", "run", str(spec),
                           "--workers", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    df = pd.read_parquet(out / journal.RESULTS)
    assert len(df) == 8 and set(df["outcome"]) == {"ok"}, df[["outcome", "message"]]
    assert int(df["ops_run"].sum()) == 200_000
    assert int(df["findings"].sum()) == 0 and set(df["first_finding_op"]) == {-1}


def test_the_same_job_gives_the_same_result(tmp_path):
    for job in (_job(bug="none", ops=200, vcpus=2), _job(bug="rmap_remove_skipped", ops=2000, shrink=6)):
        first = fuzz.run(job, tmp_path / "a")
        second = fuzz.run(job, tmp_path / "b")
        assert {k: v for k, v in first.items() if k not in TIMINGS} == {
            k: v for k, v in second.items() if k not in TIMINGS}
    assert (tmp_path / "a" / fuzz.FINDING_FILE).read_text().replace("/a/", "/b/") == (
        tmp_path / "b" / fuzz.FINDING_FILE).read_text()


def test_the_shrinker_output_is_shorter_and_still_fails():
    config = Config(vcpus=2, seed=1, bug="pte_write_ignored")
    ops = Generator(1, 2).ops(3000)
    found = run_ops(config, ops).finding
    assert found is not None
    small = shrink(config, ops, found, budget=40)
    assert len(small.ops) < found.op + 1
    again = run_ops(config, small.ops).finding
    assert again is not None and again.signature == found.signature == small.finding.signature


def test_ddmin_finds_the_operations_that_matter():
    items = [["op", k] for k in range(100)]
    needed = (["op", 13], ["op", 71], ["op", 72])
    small, calls = ddmin(items, lambda c: all(n in c for n in needed), budget=500)
    assert small == list(needed) and calls < 200


def test_a_guest_that_skips_invlpg_is_caught_by_the_reference_check():
    """The check itself: a translation left stale (the store without the INVLPG a correct
    kernel does) is a mismatch, not a pass."""
    vm = Config(vcpus=1).new_vm()
    guest = Guest(vm)
    va, frame = VAS[0], FRAMES_4K.index(0x8000)
    guest.apply(["map", 0, 0, 0, 1, frame, P | W | U])
    guest.apply(["access", 0, 0, 4])  # user write: a writable translation in the TLB
    pte = guest._entry(0, va, 1)
    assert pte is not None and idx(va, 1) == (pte & 0xFFF) // 8
    guest._store(0, pte, vm.read_u64(pte) & ~W)  # no INVLPG
    with pytest.raises(Mismatch, match="user write"):
        guest.apply(["access", 0, 0, 4])


def test_jobs_are_the_grid_of_the_axes_with_defaults():
    jobs = fuzz.jobs({"bug": ["none", "wrong_pfn"], "vcpus": [1, 4]}, quick=False)
    assert [(j["bug"], j["vcpus"]) for j in jobs] == [("none", 1), ("none", 4), ("wrong_pfn", 1),
                                                     ("wrong_pfn", 4)]
    assert all(j["ops"] == fuzz.DEFAULTS["ops"] and j["shrink"] == fuzz.DEFAULTS["shrink"] for j in jobs)
    assert fuzz.jobs({"seed": [3]}, quick=True)[0]["shrink"] == fuzz.QUICK_SHRINK
    for bad in ({"bug": ["no_such_bug"]}, {"vcpus": [5]}, {"colour": ["red"]}):
        with pytest.raises(ValueError):
            fuzz.jobs(bad, quick=False)


def test_summary_plot_and_replay_command(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = []
    for k, bug in enumerate(("none", "wrong_pfn", "wrong_pfn")):
        job = _job(bug=bug, ops=150, seed=k, shrink=4)
        rows.append({**job, **fuzz.run(job, tmp_path / str(k))})
    # The engine takes flat JSON scalars only: no None, no lists.
    assert all(isinstance(v, (str, int, float, bool)) for row in rows for v in row.values())
    df = pd.DataFrame(rows)
    summary = fuzz.summarize(df)
    assert "| wrong_pfn | 2 | 2 |" in summary and "| none | 1 | 0 |" in summary
    (png,) = fuzz.plot(df, tmp_path)
    assert png.stat().st_size > 1000
    done = subprocess.run([sys.executable, "-m", "mmud.campaign.kinds.fuzz", "replay",
                           str(tmp_path / "1" / fuzz.FINDING_FILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "replay: audit after operation" in done.stdout
