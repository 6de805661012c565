"""Campaign specs, the job grid, job ids, the kind registry and the journal (no cluster).

The engine end to end, on real Dask clusters, is tests/test_campaign.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmud import cli
from mmud.campaign import grid, journal, kinds, spec
from mmud.campaign.job import ERROR, GUEST_CRASH, OK, execute, job_id

REPO = Path(__file__).resolve().parent.parent
MINE = ("detect", "overhead", "zap")

GOOD = """
kind = "smoke"
[axes]
workload = ["kernel", "none"]
mem_mb = [64]
vcpus = [1]
seed = [1, 2, 3]
steps = [10]
[limits]
job_seconds = 5
[quick]
seed = [1]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def test_product_is_every_combination_in_spec_order() -> None:
    jobs = grid.product({"b": [2, 1], "a": ["x", "y", "z"]})
    assert jobs == [{"b": 2, "a": "x"}, {"b": 2, "a": "y"}, {"b": 2, "a": "z"},
                    {"b": 1, "a": "x"}, {"b": 1, "a": "y"}, {"b": 1, "a": "z"}]
    assert list(jobs[0]) == ["b", "a"]
    assert grid.product({"a": [1], "b": []}) == []


def test_job_id_is_stable_and_tells_jobs_apart() -> None:
    a = job_id("detect", {"bug": "wrong_pfn", "seed": 1})
    assert a == job_id("detect", {"seed": 1, "bug": "wrong_pfn"})  # key order does not count
    assert len(a) == 12 and int(a, 16) >= 0
    others = {job_id("detect", {"bug": "wrong_pfn", "seed": 2}),
              job_id("zap", {"bug": "wrong_pfn", "seed": 1}),
              job_id("detect", {"bug": "wrong_pfn", "seed": "1"})}
    assert a not in others and len(others) == 3


def test_quick_narrows_axes_and_keeps_them_all(tmp_path: Path) -> None:
    s = spec.load(write(tmp_path, GOOD))
    assert s.kind == "smoke" and s.job_seconds == 5.0
    assert len(s.jobs(quick=False)) == 6
    quick = s.jobs(quick=True)
    assert [j["seed"] for j in quick] == [1, 1] and set(quick[0]) == set(s.axes)


@pytest.mark.parametrize("name", MINE)
def test_the_campaign_specs_load_and_their_quick_grids_are_smaller(name: str) -> None:
    s = spec.load(REPO / "campaigns" / f"{name}.toml")
    assert s.kind == name
    full, quick = s.jobs(quick=False), s.jobs(quick=True)
    assert 0 < len(quick) < len(full)
    assert set(quick[0]) == set(full[0]) == set(s.axes)


@pytest.mark.parametrize("change, message", [
    (('kind = "smoke"', 'kind = "nosuch"'), "unknown campaign kind 'nosuch'"),
    (("job_seconds = 5", "job_seconds = 0"), "job_seconds must be a positive number"),
    (("job_seconds = 5", 'job_seconds = "5"'), "job_seconds must be a positive number"),
    (("seed = [1, 2, 3]", "seed = []"), "axes.seed must be a non-empty list"),
    (("seed = [1, 2, 3]", "seed = 3"), "axes.seed must be a non-empty list"),
    (("seed = [1, 2, 3]", "seed = [1, 1]"), "axes.seed lists a value twice"),
    (("seed = [1, 2, 3]", "seed = [[1]]"), "values are strings, numbers or booleans"),
    (("[quick]\nseed = [1]", "[quick]\nsteps2 = [1]"), "steps2 is not one"),
    (("steps = [10]\n", ""), "missing axes steps"),
    (("steps = [10]", 'steps = ["ten"]'), "steps must be an integer"),
    (('kind = "smoke"', 'color = 1\nkind = "smoke"'), "unknown key(s) color"),
    (("job_seconds = 5", "job_seconds = 5\nmemory = 1"), "[limits] takes job_seconds only"),
    (("[axes]", "[axes"), "not valid TOML"),
])
def test_a_bad_spec_is_refused_with_what_is_wrong(tmp_path: Path, change: tuple[str, str],
                                                  message: str) -> None:
    old, new = change
    assert old in GOOD
    with pytest.raises(spec.SpecError, match="spec.toml: .*" + _escaped(message)):
        spec.load(write(tmp_path, GOOD.replace(old, new)))


def _escaped(text: str) -> str:
    import re

    return re.escape(text)


def test_a_kind_refuses_its_bad_values_before_anything_runs(tmp_path: Path) -> None:
    text = (REPO / "campaigns" / "detect.toml").read_text().replace('"wrong_pfn"', '"no_bug"', 1)
    with pytest.raises(spec.SpecError, match="unknown bug 'no_bug'"):
        spec.load(write(tmp_path, text))


def test_cli_refuses_a_bad_spec_with_exit_2(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD.replace("job_seconds = 5", "job_seconds = -1"))
    assert cli.main(["campaign", "run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err
    assert err.startswith("mmud campaign: ") and "job_seconds" in err
    assert not (tmp_path / "out").exists()
    assert cli.main(["campaign", "run", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read the spec" in capfd.readouterr().err


def test_an_unregistered_or_missing_kind_module_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(kinds.KINDS, "ghost", "mmud.campaign.kinds.ghost")
    with pytest.raises(kinds.UnknownKind, match="registered but its module "
                       "mmud.campaign.kinds.ghost does not exist"):
        kinds.load("ghost")
    monkeypatch.setitem(kinds.KINDS, "half", "mmud.campaign.grid")  # a module, not a kind
    with pytest.raises(kinds.UnknownKind, match="lacks jobs, run, summarize, plot"):
        kinds.load("half")


def test_execute_turns_what_a_job_does_into_its_outcome(tmp_path: Path) -> None:
    job = {"workload": "kernel", "mem_mb": 64, "vcpus": 1, "seed": 1, "steps": 50}
    ok = execute("smoke", job, tmp_path / "a")
    assert ok["outcome"] == OK and ok["metrics"]["steps_run"] == 50 and ok["metrics"]["exits"] > 0
    assert not (tmp_path / "a").exists()  # nothing written: the empty job dir is removed
    bad = execute("smoke", {**job, "workload": "bogus"}, tmp_path / "b")
    assert bad["outcome"] == ERROR and "unknown workload 'bogus'" in bad["message"]
    detect = {"bug": "wrong_pfn", "mode": "ratelimited", "seed": 1, "budget_steps": 20000,
              "mem_mb": 64, "vcpus": 2}
    crash = execute("detect", detect, tmp_path / "c")  # the bug breaks the guest first
    assert crash["outcome"] == GUEST_CRASH and crash["metrics"] == {}
    assert "before the audit reported it" in crash["message"]


def entry(jid: str, seed: int) -> journal.Entry:
    return journal.Entry(job=jid, kind="smoke", params={"seed": seed}, metrics={"exits": seed * 10},
                         outcome=OK, message="", duration_s=0.1, worker="w", job_seconds=5.0)


def test_journal_keeps_whole_lines_and_cuts_a_torn_one(tmp_path: Path) -> None:
    log = journal.Journal(tmp_path)
    log.append(entry("a", 1))
    log.append(entry("b", 2))
    log.close()
    path = tmp_path / journal.JOURNAL
    path.write_text(path.read_text() + '{"job": "c", "ki')  # a stop in mid-write
    assert list(journal.read(tmp_path)) == ["a", "b"]
    log = journal.Journal(tmp_path)
    log.append(entry("d", 4))
    log.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["job"] for line in lines] == ["a", "b", "d"]
    df = journal.frame(tmp_path, journal.read(tmp_path))
    assert list(df.columns) == ["job", "seed", "exits", "outcome", "message", "duration_s",
                                "worker", "rerun"]
    assert df["rerun"][0] == f"mmud campaign rerun {tmp_path.resolve()} a"
