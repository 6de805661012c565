"""Run control through the real mount: `echo step N > vm0/state` and `vm0/break`.

Each test starts from a fresh vm0 paused at step 0 (`restart` of a paused VM), so the step
counts are those of an in-process `mmud.VM` of the same configuration: where the daemon
pauses is compared with a run that steps one step at a time and looks after each.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

import mmud
from mmud.sched import TaskFailed
from tests.fusemount import Daemon, assert_refused, echo, shell_write, status_fields, wait_for

PAUSE_TIMEOUT = 60.0


def write(d: Daemon, rel: str, word: str) -> None:
    done = echo(d.path(rel), word)
    assert done.returncode == 0, (rel, word, done.stderr)


def steps(d: Daemon) -> int:
    return int(status_fields(d.read("vm0/status"))["steps"])


def fresh(d: Daemon) -> None:
    """vm0 anew, paused at step 0, no bug, no break, the audit off and rate-limited."""
    write(d, "parameters/mmu_audit", "0")
    write(d, "parameters/mmu_audit_ratelimit_ms", "5000")
    write(d, "vm0/break", "none")
    write(d, "vm0/state", "restart")  # a crashed VM restarts running: pause, restart again
    write(d, "vm0/state", "pause")
    write(d, "vm0/state", "restart")
    assert d.read("vm0/state") == "paused\n" and steps(d) == 0


def wait_state(d: Daemon, state: str) -> None:
    wait_for(lambda: d.read("vm0/state") == f"{state}\n", PAUSE_TIMEOUT, f"vm0 {state}")


def step_to(d: Daemon, n: int) -> None:
    write(d, "vm0/state", f"step {n - steps(d)}")
    wait_state(d, "paused")
    assert steps(d) == n


def refused(path: Path, text: str) -> int:
    """The errno of one write(2) of `text` (NUL bytes too, which no shell argument holds)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode("latin-1"))
    except OSError as e:
        return e.errno or 0
    finally:
        os.close(fd)
    return 0


def local_vm() -> mmud.VM:
    """vm0 of a daemon started without options, in this process."""
    return mmud.VM(mem_mb=64, vcpus=1, seed=0, workload="kernel")


def test_break_is_0644_next_to_state(daemon):
    assert "break" in os.listdir(daemon.path("vm0"))
    assert stat.S_IMODE(os.stat(daemon.path("vm0/break")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(daemon.path("vm0/state")).st_mode) == 0o644


def test_step_runs_exactly_n_steps_then_pauses(daemon):
    fresh(daemon)
    write(daemon, "vm0/state", "step 2345")
    wait_state(daemon, "paused")
    assert steps(daemon) == 2345
    assert daemon.read("vm0/break") == "none\n"
    assert shell_write(daemon.path("vm0/state"), "step +0010\n").returncode == 0  # kstrtoull
    wait_state(daemon, "paused")
    assert steps(daemon) == 2355
    write(daemon, "vm0/state", "step 1")
    wait_state(daemon, "paused")
    assert steps(daemon) == 2356


def test_step_in_a_guest_with_nothing_to_run_pauses_where_it_is(daemon):
    assert shell_write(daemon.path("vms"), "create vm1 workload=none\n").returncode == 0
    try:
        write(daemon, "vm1/state", "step 5")
        wait_for(lambda: daemon.read("vm1/state") == "paused\n", PAUSE_TIMEOUT, "vm1 paused")
        assert status_fields(daemon.read("vm1/status"))["steps"] == "0"
    finally:
        assert shell_write(daemon.path("vms"), "destroy vm1\n").returncode == 0


def test_run_and_pause_cancel_a_pending_step(daemon):
    fresh(daemon)
    write(daemon, "vm0/state", "step 1000000000")
    assert daemon.read("vm0/state") == "running\n"
    assert status_fields(daemon.read("vm0/status"))["step to"] == "1000000000"
    write(daemon, "vm0/state", "pause")
    assert "step to" not in status_fields(daemon.read("vm0/status"))
    write(daemon, "vm0/state", "run")
    assert "step to" not in status_fields(daemon.read("vm0/status"))
    assert daemon.read("vm0/state") == "running\n"


def test_break_at_a_step_stops_there_and_says_so(daemon):
    fresh(daemon)
    write(daemon, "vm0/break", "step=777")
    assert daemon.read("vm0/break") == "step=777\n"
    write(daemon, "vm0/state", "run")
    wait_state(daemon, "paused")
    assert steps(daemon) == 777
    assert daemon.read("vm0/break") == "step=777\nhit step=777 at step 777\n"
    assert status_fields(daemon.read("vm0/status"))["break"] == "step=777, hit at step 777"


def test_a_break_survives_a_restart_and_fires_again(daemon):
    fresh(daemon)
    write(daemon, "vm0/break", "step=300")
    write(daemon, "vm0/state", "run")
    wait_state(daemon, "paused")
    write(daemon, "vm0/state", "restart")  # paused: restarts paused, the hit forgotten
    assert daemon.read("vm0/break") == "step=300\n" and steps(daemon) == 0
    write(daemon, "vm0/state", "step 5000")  # the break comes first
    wait_state(daemon, "paused")
    assert steps(daemon) == 300
    assert "step to" not in status_fields(daemon.read("vm0/status"))  # the step is over too


def test_none_disarms(daemon):
    fresh(daemon)
    write(daemon, "vm0/break", "step=500")
    write(daemon, "vm0/break", "none")
    assert daemon.read("vm0/break") == "none\n"
    assert "break" not in status_fields(daemon.read("vm0/status"))
    step_to(daemon, 1000)  # past 500 without a stop


def test_audit_error_pauses_at_the_step_of_the_first_report(daemon):
    """The pause step is the one after which an in-process run of the same seed, stepped
    one step at a time, first counts an audit error."""
    start = 10_000
    fresh(daemon)
    step_to(daemon, start)
    write(daemon, "parameters/mmu_audit_ratelimit_ms", "0")
    write(daemon, "parameters/mmu_audit", "1")
    write(daemon, "vm0/inject", "rmap_add_skipped")
    write(daemon, "vm0/break", "audit_error")
    assert daemon.read("vm0/break") == "audit_error\n"
    write(daemon, "vm0/state", "run")
    wait_state(daemon, "paused")
    paused = steps(daemon)
    errors = int(daemon.read(f"kvm/{daemon.per_vm_dir()}/mmu_audit_errors"))
    assert daemon.read("vm0/break") == f"audit_error\nhit audit_error at step {paused}\n"

    vm = local_vm()
    vm.step(start)
    vm.params["mmu_audit_ratelimit_ms"] = b"0\n"
    vm.params["mmu_audit"] = b"1\n"
    vm.inject("rmap_add_skipped")
    while vm.stat["mmu_audit_errors"] == 0:
        vm.step(1)
    assert paused == vm.steps > start
    assert errors == vm.stat["mmu_audit_errors"]  # the errors of that one step, no more


def test_guest_crash_breaks_where_the_crash_is(daemon):
    fresh(daemon)
    step_to(daemon, 300)
    write(daemon, "vm0/inject", "wrong_pfn")  # the guest reads a wrong frame and oopses
    write(daemon, "vm0/break", "guest_crash")
    write(daemon, "vm0/state", "run")
    wait_state(daemon, "crashed")
    crashed = steps(daemon)
    assert daemon.read("vm0/break") == f"guest_crash\nhit guest_crash at step {crashed}\n"
    assert "failure" in status_fields(daemon.read("vm0/status"))
    assert_refused(shell_write(daemon.path("vm0/state"), "step 1\n"))  # only restart revives it

    vm = local_vm()
    vm.step(300)
    vm.inject("wrong_pfn")
    with pytest.raises(TaskFailed):
        while True:
            vm.step(1)
    assert crashed == vm.steps > 300  # the steps completed before the one that raised


def test_a_crash_during_step_n_leaves_the_vm_crashed(daemon):
    fresh(daemon)
    step_to(daemon, 300)
    write(daemon, "vm0/inject", "wrong_pfn")
    write(daemon, "vm0/state", "step 100000")
    wait_state(daemon, "crashed")
    assert steps(daemon) < 100_300
    assert daemon.read("vm0/break") == "none\n"
    assert "step to" not in status_fields(daemon.read("vm0/status"))


@pytest.mark.parametrize("text", [
    "step 0", "step", "step ", "step -1", "step x", "step 1 2", "step  5", "step 0x10", "step5",
    "Step 5", "step 5\n\n", "step 18446744073709551616", "step=5", "step 5\0", "run 5"])
def test_state_refuses_a_bad_step(daemon, text):
    fresh(daemon)
    assert refused(daemon.path("vm0/state"), text) == errno.EINVAL
    assert daemon.read("vm0/state") == "paused\n" and steps(daemon) == 0


@pytest.mark.parametrize("text", [
    "foo", "step=", "step=0", "step=x", "step = 5", "step 5", "step=-5", "step=5\n\n",
    "audit_error extra", "Audit_error", "none\n\n", "guest_crash\0", "step=99999999999999999999"])
def test_break_refuses_a_bad_condition(daemon, text):
    write(daemon, "vm0/state", "pause")
    write(daemon, "vm0/break", "step=4242")
    assert refused(daemon.path("vm0/break"), text) == errno.EINVAL
    assert daemon.read("vm0/break") == "step=4242\n"
    write(daemon, "vm0/break", "none")
