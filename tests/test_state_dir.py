"""The state directory's fault history: whole records, a full disk survived, rotation, reading
back (kvm/isolation/history), and each fault credited to its VM.

Full disks are real: a 64 KiB tmpfs mounted for the test (root only), filled by a filler file.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import mmud
from mmud.daemon import faultlog
from mmud.daemon.faultlog import HISTORY, FaultLogPublisher
from mmud.daemon.protocol import SimConfig, Snapshot, VmConfig
from mmud.daemon.sim import Simulation
from mmud.kvm.module import KvmModule
from tests.fusemount import Daemon, echo, shell_write, wait_for

ON = {"address_space_isolation": "1"}
ARGS = ("--param", "address_space_isolation=1", "--seed", "3")
COLUMNS = ["run", "vm", "entry", "ip", "address", "object", "count"]
PAGE = 4096


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def tiny(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A 64 KiB tmpfs: a state directory that really fills up (unmounted at the end)."""
    path = workdir / f"tiny-{request.node.name}"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(path)], check=False))
    return path


def fill(directory: Path) -> Path:
    """Write a filler file until the file system is full (ENOSPC)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * PAGE)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


def records(path: Path) -> list[dict]:
    """Every line of a history file, each required to parse (no torn line)."""
    return [json.loads(line) for line in lines(path)]


def describe_as(name: str, seed: int = 1):
    return lambda vm: {"vm": name, "seed": seed, "step": vm.steps}


def faulting_vm(module: KvmModule | None = None, steps: int = 3000) -> mmud.VM:
    """A VM that has taken its first isolation faults (creating it cleared the module's log)."""
    vm = (mmud.VM(seed=1, workload="kernel", module=module) if module else
          mmud.VM(seed=1, workload="kernel", params=mmud.Params(ON)))
    vm.step(steps)
    assert vm.module.isolation.log.pending
    return vm


def events(captured: list[dict], name: str) -> list[dict]:
    return [e for e in captured if e["event"] == name]


def history_rows(text: str) -> list[list[str]]:
    header, *rows = text.splitlines()
    assert header.split() == COLUMNS
    return [row.split() for row in rows]


# -- records: one whole line each, with what the history table needs --------------------------


def test_each_record_is_one_line_with_the_run_the_vm_and_the_table_columns(tmp_path):
    vm = faulting_vm()
    publisher = FaultLogPublisher(vm.module.isolation, str(tmp_path))
    logs = publisher.logs(describe_as("vm0"))
    found = records(tmp_path / HISTORY)
    table = vm.module.isolation.log.table_lines()[1:]
    assert len(found) == len(table) > 0
    for r, row in zip(found, table, strict=True):
        assert (r["run"], r["vm"], r["seed"], r["step"]) == (1, "vm0", 1, 3000)
        n, ip, address, obj, count = row.split()
        assert (str(r["entry"]), r["ip"], r["address"], r["object"], str(r["count"])) == \
            (n, ip, address, obj, count)
        assert f"page fault #{n} " in r["lines"][0]
    rows = history_rows("\n".join(logs["isolation/history"]))
    assert rows == [["1", "vm0", *row.split()] for row in table]


# -- a full disk --------------------------------------------------------------------------------


def test_a_short_write_is_undone_counted_and_logged_once_then_writes_resume(tiny):
    """100 bytes are left in the history file's last page: each record gets that far, and the
    write is undone, so the file never holds part of a record."""
    path = tiny / HISTORY
    earlier = {"run": 1, "vm": "vm0", "entry": 0, "ip": "f+0x1/0x2", "address": "0" * 16,
               "object": "-", "count": 1, "lines": []}
    pad = PAGE - 100 - len(json.dumps({**earlier, "pad": ""})) - 1
    path.write_text(json.dumps({**earlier, "pad": "x" * pad}) + "\n")
    assert path.stat().st_size == PAGE - 100
    before = path.read_bytes()
    filler = fill(tiny)
    vm = faulting_vm()
    publisher = FaultLogPublisher(vm.module.isolation, str(tiny))
    assert publisher.run == 2 and publisher.state_write_failures == 0
    with capture_logs() as captured:
        publisher.logs(describe_as("vm0"))
        lost = publisher.state_write_failures
        assert lost >= 3  # every record of the VM's first faults
        assert path.read_bytes() == before  # every short write undone
        (failed,) = events(captured, "state_write_failed")
        assert (failed["errno"], failed["error"], failed["path"]) == \
            (errno.ENOSPC, "ENOSPC", str(path))
        vm.step(3000)
        faulting_vm(vm.module)  # a new VM: the log is cleared, its faults logged again
        publisher.logs(describe_as("vm1"))
        assert publisher.state_write_failures > lost
        assert len(events(captured, "state_write_failed")) == 1  # once per episode
        assert path.read_bytes() == before
        filler.unlink()
        faulting_vm(vm.module)
        publisher.logs(describe_as("vm2"))
    (recovered,) = events(captured, "state_write_recovered")
    assert recovered["lost"] == publisher.state_write_failures
    found = records(path)
    assert found[0]["pad"] and {r["vm"] for r in found[1:]} == {"vm2"}
    assert {r["run"] for r in found[1:]} == {2}


def test_status_shows_the_failure_count_only_with_a_state_dir():
    from mmud.daemon.status import RateMeter, render_status

    vm = mmud.VM(mem_mb=16)
    rates = RateMeter().update(0, vm.stats)
    with_dir = render_status(vm, "running", rates, None, pid=1, state_write_failures=7)
    fields = dict(line.split(":", 1) for line in with_dir.splitlines())
    assert fields["state write failures"].strip() == "7"
    assert "state write" not in render_status(vm, "running", rates, None, pid=1)


# -- rotation -----------------------------------------------------------------------------------


def test_rotation_keeps_one_old_file_below_the_size(tmp_path, monkeypatch):
    assert faultlog.ROTATE_BYTES == 1 << 20  # the size docs/isolation.md gives
    docs = (Path(__file__).resolve().parent.parent / "docs" / "isolation.md").read_text()
    assert "`fault_log.jsonl` past 1 MiB" in docs
    monkeypatch.setattr(faultlog, "ROTATE_BYTES", 2000)
    module = faulting_vm().module
    publisher = FaultLogPublisher(module.isolation, str(tmp_path))
    written = []
    for i in range(4):
        faulting_vm(module, steps=1000)
        with capture_logs() as captured:
            publisher.logs(describe_as(f"vm{i}"))
        assert not events(captured, "state_write_failed")
        written += [e for e in captured if e["event"] == "isolation_fault"]
    current, old = tmp_path / HISTORY, tmp_path / f"{HISTORY}.1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [HISTORY, f"{HISTORY}.1"]
    assert 0 < current.stat().st_size <= 2000 and 0 < old.stat().st_size <= 2000
    kept = records(old) + records(current)
    assert len(kept) < len(written)  # the oldest went with the rotations
    assert kept == [{k: e[k] for k in kept[0]} for e in written[-len(kept):]]  # the newest, in order
    # read back at the next start: both files, oldest first
    again = FaultLogPublisher(module.isolation, str(tmp_path))
    assert again.run == 2
    assert [row[:3] for row in history_rows("\n".join(again.logs(describe_as("x"))["isolation/history"]))] \
        == [[str(r["run"]), r["vm"], str(r["entry"])] for r in kept]


# -- reading back -------------------------------------------------------------------------------


def test_torn_and_unparseable_lines_are_skipped_and_the_next_record_gets_its_own_line(tmp_path):
    path = tmp_path / HISTORY
    old = [{"run": 7, "vm": "vm0", "seed": 0, "step": 9, "entry": n, "ip": f"f{n}+0x1/0x2",
            "address": "ffff888100000000", "object": "kvm+0x0", "count": 2, "lines": []}
           for n in range(2)]
    torn = json.dumps(old[0])[:40]
    path.write_text(json.dumps(old[0]) + "\nnot json\n[1, 2]\n" + json.dumps(old[1]) + "\n" + torn)
    vm = faulting_vm()
    with capture_logs() as captured:
        publisher = FaultLogPublisher(vm.module.isolation, str(tmp_path))
    (skipped,) = events(captured, "state_lines_skipped")
    assert skipped["lines"] == 3
    assert publisher.run == 8
    logs = publisher.logs(describe_as("vm0"))
    rows = history_rows("\n".join(logs["isolation/history"]))
    assert rows[:2] == [["7", "vm0", "0", "f0+0x1/0x2", "ffff888100000000", "kvm+0x0", "2"],
                        ["7", "vm0", "1", "f1+0x1/0x2", "ffff888100000000", "kvm+0x0", "2"]]
    assert {row[0] for row in rows[2:]} == {"8"} and len(rows) > 2
    text = lines(path)
    assert text[4] == torn.encode()  # left alone, on a line of its own
    new = [json.loads(line) for line in text[5:]]
    assert len(new) == len(rows) - 2 and {r["run"] for r in new} == {8}


# -- attribution in the simulation ----------------------------------------------------------


def test_the_simulation_credits_each_fault_to_the_vm_that_took_it(tmp_path):
    """Two VMs on one module: vm1 (the newest) faults first, then vm0 reaches new IPs; every
    record names the VM whose fault it is, with that VM's step."""
    requests, _ = multiprocessing.Pipe()
    snapshots, out = multiprocessing.Pipe()
    config = SimConfig(vms=(VmConfig("vm0", seed=1), VmConfig("vm1", seed=2)), load=ON,
                       state_dir=str(tmp_path))
    sim = Simulation(config, requests, out)
    vm0, vm1 = (s.vm for s in sim.slots)
    vm1.step(200)
    sim.publish()
    vm0.step(3000)
    sim.publish()
    snap: Snapshot | None = None
    while snapshots.poll(0):
        snap = snapshots.recv()
    assert isinstance(snap, Snapshot)
    found = records(tmp_path / HISTORY)
    first = [r for r in found if r["vm"] == "vm1"]
    later = [r for r in found if r["vm"] == "vm0"]
    assert first and later and found == first + later
    assert {(r["seed"], r["step"]) for r in first} == {(2, 200)}
    assert {(r["seed"], r["step"]) for r in later} == {(1, 3000)}
    rows = history_rows("\n".join(snap.logs["isolation/history"]))
    assert [row[1] for row in rows] == [r["vm"] for r in found]
    assert "state write failures: 0" in " ".join(snap.vms[0].status.split())


# -- through a real daemon ----------------------------------------------------------------------


def status(d: Daemon) -> dict[str, str]:
    return {k: v.strip() for k, v in (line.split(":", 1) for line in d.read("vm0/status").splitlines())}


def failures(d: Daemon) -> int:
    return int(status(d)["state write failures"])


def count(d: Daemon, event: str) -> int:
    return d.log().count(f'"event": "{event}"')


@pytest.fixture
def full_daemon(tiny) -> Iterator[tuple[Daemon, Path]]:
    """A daemon whose state directory is full from the start."""
    filler = fill(tiny)
    d = Daemon(tiny.parent / f"{tiny.name}-mnt", *ARGS, "--state-dir", str(tiny)).start()
    yield d, filler
    if d.proc.poll() is None:
        assert d.stop() == 0, d.log()


def test_a_full_state_dir_is_counted_logged_once_and_the_run_goes_on(full_daemon):
    d, filler = full_daemon
    history = filler.parent / HISTORY
    wait_for(lambda: failures(d) > 0, 5, "a failed history write")
    steps = int(status(d)["steps"])
    wait_for(lambda: int(status(d)["steps"]) > steps, 5, "steps to advance")
    assert d.read("vm0/state") == "running\n" and d.proc.poll() is None
    assert echo(d.path("vm0/state"), "restart").returncode == 0  # more records, more failures
    wait_for(lambda: failures(d) > 0 and "isolation_fault" in d.log(), 5, "faults")
    assert echo(d.path("vm0/state"), "pause").returncode == 0  # no new records meanwhile
    assert count(d, "state_write_failed") == 1, d.log()
    assert '"error": "ENOSPC"' in d.log() and str(history) in d.log()
    assert records(history) == []  # nothing torn: each record whole or absent
    # this run's faults are still shown
    assert any(row[0] == "1" and row[1] == "vm0" for row in history_rows(d.read("kvm/isolation/history")))
    time.sleep(0.2)  # the paused loop still publishes: the count settles
    lost = failures(d)
    filler.unlink()
    assert echo(d.path("vm0/state"), "restart").returncode == 0  # restarts paused
    assert echo(d.path("vm0/state"), "run").returncode == 0
    wait_for(lambda: records(history), 5, "writes to resume")
    wait_for(lambda: count(d, "state_write_recovered") == 1, 5, "state_write_recovered")
    assert count(d, "state_write_failed") == 1 and failures(d) == lost
    assert {r["vm"] for r in records(history)} == {"vm0"}


@pytest.fixture
def daemon_on(tiny) -> Iterator[Daemon]:
    d = Daemon(tiny.parent / f"{tiny.name}-mnt", *ARGS, "--state-dir", str(tiny)).start()
    yield d
    if d.proc.poll() is None:
        assert d.stop() == 0, d.log()


def test_a_state_dir_that_fills_while_running_never_holds_a_torn_record(daemon_on, tiny):
    d = daemon_on
    history = tiny / HISTORY
    wait_for(lambda: records(history), 5, "the first records")
    fill(tiny)
    for _ in range(3):  # each restart logs every fault again: records that cannot all fit
        assert echo(d.path("vm0/state"), "restart").returncode == 0
        wait_for(lambda: status(d)["steps"] != "0", 5, "the VM to run")
    wait_for(lambda: failures(d) > 0, 5, "a failed history write")
    assert records(history)  # every line parses: short writes were undone
    assert d.read("vm0/state") == "running\n" and d.proc.poll() is None
    failed, recovered = count(d, "state_write_failed"), count(d, "state_write_recovered")
    assert failed >= 1 and recovered in (failed - 1, failed)
    steps = int(status(d)["steps"])
    wait_for(lambda: int(status(d)["steps"]) > steps, 5, "steps to advance")


def test_a_torn_history_does_not_stop_the_daemon_and_history_shows_it(workdir):
    state = workdir / "torn-state"
    state.mkdir()
    old = {"run": 4, "vm": "vm0", "seed": 3, "step": 10, "entry": 0, "ip": "set_spte+0x52/0x158",
           "address": "ffff888200003008", "object": "mmu_shadow_page+0x3008", "count": 5,
           "lines": ["[    0.000040] KVM isolation: page fault #0 (2) at set_spte+0x52/0x158 [kvm]"]}
    (state / HISTORY).write_text(json.dumps(old) + "\n" + json.dumps(old)[:50])
    d = Daemon(workdir / "torn", *ARGS, "--state-dir", str(state)).start()
    try:
        wait_for(lambda: any(r[0] == "5" for r in history_rows(d.read("kvm/isolation/history"))),
                 5, "this run's rows")
        rows = history_rows(d.read("kvm/isolation/history"))
        assert rows[0] == ["4", "vm0", "0", "set_spte+0x52/0x158", "ffff888200003008",
                           "mmu_shadow_page+0x3008", "5"]
        assert {r[0] for r in rows[1:]} == {"5"} and {r[1] for r in rows[1:]} == {"vm0"}
        assert d.read("vm0/state") == "running\n"
        wait_for(lambda: len(lines(state / HISTORY)) > 2, 5, "this run's records")
        text = lines(state / HISTORY)
        assert [json.loads(line)["run"] for line in text[:1] + text[2:]] == \
            [4] + [5] * (len(text) - 2)
        assert '"event": "state_lines_skipped"' in d.log()
    finally:
        assert d.stop() == 0, d.log()


def test_history_after_a_daemon_restart_shows_the_first_runs_faults(workdir):
    state = workdir / "restart-state"
    d = Daemon(workdir / "again", *ARGS, "--state-dir", str(state)).start()
    try:
        wait_for(lambda: len(history_rows(d.read("kvm/isolation/history"))) >= 3, 5, "rows")
        first = d.read("kvm/isolation/history").splitlines()[1:]
    finally:
        assert d.stop() == 0, d.log()
    assert {(row.split()[0], row.split()[1]) for row in first} == {("1", "vm0")}
    d.start()
    try:
        wait_for(lambda: any(r[0] == "2" for r in history_rows(d.read("kvm/isolation/history"))),
                 5, "the second run's rows")
        text = d.read("kvm/isolation/history").splitlines()
        assert text[1:1 + len(first)] == first  # the first run, as it showed, oldest first
        assert {(r[0], r[1]) for r in history_rows("\n".join(text))[len(first):]} == {("2", "vm0")}
    finally:
        assert d.stop() == 0, d.log()


def test_a_daemon_with_two_vms_credits_each_fault_to_its_vm(workdir):
    """vm1 (idle, the newest) takes no fault: vm0's faults after its creation say vm0.  Then
    with vm0 paused, vm2's say vm2 (the `vms` file creates them)."""
    state = workdir / "two-state"
    d = Daemon(workdir / "two", *ARGS, "--state-dir", str(state)).start()
    history = state / HISTORY
    try:
        wait_for(lambda: records(history), 5, "vm0's first records")
        assert shell_write(d.path("vms"), "create vm1 mem=16M workload=none\n").returncode == 0
        created = int(status(d)["steps"])
        wait_for(lambda: any(r["step"] >= created for r in records(history)), 5,
                 "vm0's records after vm1 cleared the log")
        assert echo(d.path("vm0/state"), "pause").returncode == 0
        time.sleep(0.1)
        paused = len(records(history))
        assert {r["vm"] for r in records(history)} == {"vm0"}
        assert shell_write(d.path("vms"), "create vm2 mem=16M seed=5\n").returncode == 0
        wait_for(lambda: len(records(history)) > paused, 5, "vm2's records")
        later = records(history)[paused:]
        assert {(r["vm"], r["seed"]) for r in later} == {("vm2", 5)}
        rows = history_rows(d.read("kvm/isolation/history"))
        assert [row[1] for row in rows] == [r["vm"] for r in records(history)][:len(rows)]
    finally:
        assert d.stop() == 0, d.log()
