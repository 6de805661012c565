"""vm0/state and vm0/status: pause freezes the VM, run resumes it, restart starts afresh."""

import time

from tests.fusemount import assert_refused, echo, shell_write, wait_for


def steps(daemon) -> int:
    fields = dict(line.split(":", 1) for line in daemon.read("vm0/status").splitlines())
    return int(fields["steps"])


def test_status_summary(daemon):
    text = daemon.read("vm0/status")
    for key in ("state:", "memory:", "vcpus:", "workload:", "seed:", "steps:", "shadow pages:",
                "steps/s:", "pf_fixed/s:"):
        assert key in text
    assert "64 MiB" in text and "kernel" in text


def test_pause_freezes_and_run_resumes(daemon):
    assert daemon.read("vm0/state") == "running\n"
    assert echo(daemon.path("vm0/state"), "pause").returncode == 0
    assert daemon.read("vm0/state") == "paused\n"
    frozen_steps, frozen_exits = steps(daemon), daemon.read("kvm/exits")
    time.sleep(0.3)
    assert (steps(daemon), daemon.read("kvm/exits")) == (frozen_steps, frozen_exits)
    assert echo(daemon.path("vm0/state"), "run").returncode == 0
    assert daemon.read("vm0/state") == "running\n"
    wait_for(lambda: steps(daemon) > frozen_steps, 10, "steps to move again")


def test_restart_builds_a_fresh_vm(daemon):
    wait_for(lambda: steps(daemon) > 1000, 10, "1000 steps")
    assert echo(daemon.path("vm0/state"), "pause").returncode == 0
    before = steps(daemon)
    assert before >= 1000
    assert echo(daemon.path("vm0/state"), "restart").returncode == 0
    assert steps(daemon) == 0 and int(daemon.read("kvm/exits")) == 0
    assert daemon.read("vm0/state") == "paused\n"  # the run state survives a restart
    assert echo(daemon.path("vm0/state"), "run").returncode == 0
    wait_for(lambda: steps(daemon) > 0, 10, "the fresh VM to run")


def test_state_refuses_other_words(daemon):
    for bad in ("stop", "Run", "run\n\n", " run"):
        assert_refused(shell_write(daemon.path("vm0/state"), bad))
    assert daemon.read("vm0/state") == "running\n"
