"""The simulation process dies or hangs: the daemon keeps serving, keeps the parameters, and
`restart` starts a fresh simulation on the same mount (docs/daemon.md, "When the simulation
dies").  Real daemons, real signals, shell clients through the real mount."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from mmud.daemon.client import SimError, _SimProcess
from mmud.daemon.mountpoint import is_mounted
from mmud.daemon.protocol import SimConfig, VmConfig
from tests.fusemount import Daemon, assert_refused, echo, shell_write, status_fields, wait_for



def assert_eio(done: subprocess.CompletedProcess) -> None:
    """A shell command failed with EIO (dash's echo says "I/O error", coreutils
    "Input/output error")."""
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "I/O error" in done.stderr or "Input/output error" in done.stderr, done.stderr


def steps(d: Daemon, vm: str = "vm0") -> int:
    return int(status_fields(d.read(f"{vm}/status"))["steps"])


def kill_simulation(d: Daemon, sig: int = signal.SIGKILL) -> int:
    pid = d.sim_pid()
    # the same process the per-VM debugfs directories kvm/<pid>-<fd> name
    assert any(n.startswith(f"{pid}-") for n in os.listdir(d.path("kvm")))
    os.kill(pid, sig)
    return pid


def wait_failed(d: Daemon, timeout: float) -> None:
    wait_for(lambda: d.read("vm0/state") == "failed\n", timeout, "vm0/state to read failed")


def stop_cleanly(d: Daemon) -> None:
    t0 = time.monotonic()
    assert d.stop() == 0, d.log()  # never 141 / -SIGPIPE, never 1
    assert time.monotonic() - t0 < 2.0
    assert not is_mounted(d.mount)


def test_killed_simulation_the_mount_keeps_serving_and_restart_brings_it_back(workdir):
    d = Daemon(workdir / "killed").start()
    try:
        wait_for(lambda: steps(d) > 0, 10, "the VM to run")
        assert d.read("parameters/mmu_audit") == "N\n"
        pid = kill_simulation(d)
        wait_failed(d, 1.0)
        status = status_fields(d.read("vm0/status"))
        assert status["state"] == "failed" and status["pid"] == str(pid)
        assert "killed by SIGKILL (signal 9)" in status["failure"]
        assert f"last step seen {status['steps']}" in status["failure"]
        # statistics answer with the last snapshot's values, and stay there
        exits = d.read("kvm/exits")
        assert int(exits) > 0
        assert d.read(f"kvm/{d.per_vm_dir()}/exits") == exits
        time.sleep(0.2)
        assert d.read("kvm/exits") == exits
        # parameters are the daemon's: a store works and reads back at once
        assert echo(d.path("parameters/mmu_audit"), "1").returncode == 0
        assert d.read("parameters/mmu_audit") == "Y\n"
        assert d.read("kvm/mmu-debug") == "1\n"
        # what needs the simulation fails with EIO at once, not after the request timeout
        for rel, word in (("vm0/zap_all", "fast"), ("vm0/inject", "wrong_pfn"),
                          ("vm0/state", "pause"), ("vm0/state", "run"), ("kvm/exits", "0")):
            t0 = time.monotonic()
            done = echo(d.path(rel), word)
            assert time.monotonic() - t0 < 0.1, (rel, word)
            assert_eio(done)
        done = subprocess.run(["head", "-c", "16", str(d.path("vm0/memory"))],
                              capture_output=True, text=True, check=False)
        assert done.returncode != 0 and "Input/output error" in done.stderr, done.stderr
        assert len(d.events("simulation_died")) == 1
        assert d.events("simulation_died")[0]["cause"] == "killed by SIGKILL (signal 9)"
        # restart: a fresh simulation process, with the parameters as they are now
        assert echo(d.path("vm0/state"), "restart").returncode == 0
        wait_for(lambda: d.read("vm0/state") == "running\n", 5, "vm0 to run again")
        new_pid = d.sim_pid()
        assert new_pid != pid and d.per_vm_dir().startswith(f"{new_pid}-")
        assert not os.path.exists(f"/proc/{pid}")  # the dead one was reaped
        first = steps(d)
        wait_for(lambda: steps(d) > first, 5, "steps to advance")
        assert d.read("parameters/mmu_audit") == "Y\n"
        assert "failure" not in d.read("vm0/status")
        wait_for(lambda: int(d.read("kvm/mmu_audit_runs")) > 0, 5, "the audit to run")
        assert echo(d.path("vm0/zap_all"), "fast").returncode == 0  # served again
        assert len(d.events("simulation_died")) == 1
        assert [e["pid"] for e in d.events("simulation_restarted")] == [new_pid]
    finally:
        stop_cleanly(d)


def test_every_parameter_store_works_while_dead_and_carries_into_the_restart(workdir):
    d = Daemon(workdir / "params", "--param", "mmio_caching=0").start()
    try:
        kill_simulation(d)
        wait_failed(d, 1.0)
        stores = {"mmu_audit": ("1", "Y\n"), "mmu_audit_ratelimit_ms": ("0x10", "16\n"),
                  "mmu_audit_ratelimit_burst": ("3", "3\n"),
                  "mmu_audit_scope": ("incremental", "incremental\n")}
        for name, (text, shown) in stores.items():
            assert shell_write(d.path(f"parameters/{name}"), text).returncode == 0, name
            assert d.read(f"parameters/{name}") == shown
        # refusals are the same as with a live simulation
        assert_refused(shell_write(d.path("parameters/mmu_audit"), "y"))
        assert_refused(shell_write(d.path("parameters/mmu_audit_ratelimit_burst"), "4294967296"),
                       "Numerical result out of range")
        done = echo(d.path("parameters/mmio_caching"), "1")
        assert done.returncode != 0 and "Permission denied" in done.stderr
        assert echo(d.path("kvm/mmu-debug"), "0").returncode == 0
        assert d.read("parameters/mmu_audit") == "N\n"
        assert echo(d.path("kvm/mmu-debug"), "1").returncode == 0
        assert echo(d.path("vm0/state"), "restart").returncode == 0
        # now rendered by the new simulation: it started with these values
        for name, (_, shown) in stores.items():
            assert d.read(f"parameters/{name}") == shown, name
        assert d.read("parameters/mmio_caching") == "N\n"  # load-time values are kept too
        assert shell_write(d.path("parameters/mmu_audit_ratelimit_burst"), "5").returncode == 0
        assert d.read("parameters/mmu_audit_ratelimit_burst") == "5\n"
    finally:
        stop_cleanly(d)


def test_restart_rebuilds_every_vm_from_its_last_configuration(workdir):
    """vm1 exists only in the simulation (a migration made it): its config comes from the
    snapshot; vm0's command-line configuration is kept."""
    d = Daemon(workdir / "config", "--mem", "32M", "--vcpus", "2", "--seed", "7").start()
    try:
        assert echo(d.path("vm0/migrate"), "start").returncode == 0
        wait_for(lambda: os.path.exists(d.path("vm1/status")), 5, "vm1")
        kill_simulation(d)
        wait_failed(d, 1.0)
        assert d.read("vm1/state") == "failed\n"
        assert echo(d.path("vm1/state"), "restart").returncode == 0  # any vm<N>/state
        vm0, vm1 = status_fields(d.read("vm0/status")), status_fields(d.read("vm1/status"))
        assert (vm0["memory"], vm0["vcpus"], vm0["seed"], vm0["workload"]) == \
            ("32 MiB", "2", "7", "kernel")
        assert (vm1["memory"], vm1["vcpus"], vm1["seed"], vm1["workload"]) == \
            ("32 MiB", "2", "7", "none")
        assert vm0["pid"] == vm1["pid"] == str(d.sim_pid())
    finally:
        stop_cleanly(d)


def test_dead_simulation_watchdog_keeps_pinging_and_sigterm_exits_zero(workdir):
    """The old daemon died of SIGPIPE here (status 141): libfuse reset SIGPIPE to SIG_DFL on
    the way out and the `stop` went to the dead simulation's pipe."""
    path = str(workdir / "dead-notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        d = Daemon(workdir / "dead", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        d.start()
        kill_simulation(d)
        wait_failed(d, 1.0)
        seen: list[str] = []
        while not any(s.startswith("STATUS=simulation failed") for s in seen):
            seen.extend(sock.recv(4096).decode().splitlines())
        failed_at = len(seen)
        while seen[failed_at:].count("WATCHDOG=1") < 3:  # pings go on: the daemon is alive
            seen.extend(sock.recv(4096).decode().splitlines())
        assert "killed by SIGKILL" in next(s for s in seen if s.startswith("STATUS=simulation failed"))
        stop_cleanly(d)
        while "STOPPING=1" not in seen:
            seen.extend(sock.recv(4096).decode().splitlines())
        assert "Traceback" not in d.log()


def test_hung_simulation_is_killed_and_reported_failed(workdir):
    d = Daemon(workdir / "hung", env={"MMUD_SIM_HANG_SECONDS": "1"}).start()
    try:
        pid = kill_simulation(d, signal.SIGSTOP)
        t0 = time.monotonic()
        wait_failed(d, 3.0)
        assert time.monotonic() - t0 >= 0.5  # not before the hang timeout
        assert "hung" in status_fields(d.read("vm0/status"))["failure"]
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 2, "the hung process to be killed")
        (died,) = d.events("simulation_died")
        assert died["cause"].startswith("hung") and died["pid"] == pid
        t0 = time.monotonic()
        assert_eio(echo(d.path("vm0/zap_all"), "fast"))
        assert time.monotonic() - t0 < 0.1
        assert echo(d.path("vm0/state"), "restart").returncode == 0
        assert d.read("vm0/state") == "running\n"
    finally:
        stop_cleanly(d)


def test_a_simulation_exception_is_its_reported_cause():
    """What ends the simulation with an exception is sent back as its last words (here at
    start-up: a VM configuration of the wrong type, which only Python itself refuses)."""
    proc = _SimProcess(SimConfig(vms=(VmConfig(vcpus="2"),)))  # type: ignore[arg-type]
    with pytest.raises(SimError, match="TypeError"):
        proc.start()
    assert proc.cause().startswith("raised TypeError")
    assert proc.proc.exitcode == 1
