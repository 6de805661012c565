"""Start, stop, crash recovery, refused mount points and the sd_notify protocol, end to end."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from mmud.daemon.mountpoint import is_mounted
from tests.fusemount import REPO, Daemon, cat, wait_for


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_exits_zero_within_two_seconds(workdir, sig):
    d = Daemon(workdir / f"sig{sig}").start()
    t0 = time.monotonic()
    assert d.stop(sig) == 0, d.log()
    assert time.monotonic() - t0 < 2.0
    assert not is_mounted(d.mount)
    assert '"mounted"' in d.log() and '"stopped"' in d.log()


def test_sigkill_then_restart_on_the_same_mount_point(workdir):
    d = Daemon(workdir / "crash").start()
    sim_pid = int(d.per_vm_dir().split("-")[0])
    d.stop(signal.SIGKILL)
    with pytest.raises(OSError):  # Transport endpoint is not connected
        os.stat(d.mount / "parameters")
    wait_for(lambda: not os.path.exists(f"/proc/{sim_pid}"), 5, "the orphaned simulation to exit")
    d.start()
    assert "stale_mount_cleared" in d.log()
    assert cat(d.path("parameters/mmu_audit")) == "N\n"
    assert d.stop() == 0


def test_restart_right_after_sigkill_of_the_daemon_and_its_simulation(workdir):
    """Within the kernel's attribute cache time (1 s) a dead mount still answers stat(2);
    the mount point check lists the directory instead, which must reach a daemon."""
    d = Daemon(workdir / "sigkill-now").start()
    sim_pid = d.sim_pid()
    os.stat(d.mount)  # the root's attributes cached: stat keeps succeeding for 1 s
    os.kill(d.proc.pid, signal.SIGKILL)
    os.kill(sim_pid, signal.SIGKILL)
    d.proc.wait(5)
    d.start()
    assert d.proc.poll() is None, d.log()
    assert "already a mount point" not in d.log()
    assert "stale_mount_cleared" in d.log()
    assert cat(d.path("parameters/mmu_audit")) == "N\n"
    assert d.sim_pid() != sim_pid
    assert d.stop() == 0


def test_exception_in_the_main_process_exits_one(workdir):
    """A real one: the mount point is removed while the simulation starts, so libfuse cannot
    mount (mfusepy raises RuntimeError).  Status 1, one `daemon_failed` event with the
    traceback in it, the simulation stopped, no bare traceback on the output."""
    mnt = workdir / "vanishing"
    d = Daemon(mnt)
    d.start(wait=False)
    deadline = time.monotonic() + 30
    while not mnt.exists():  # created by the mount point check, before the simulation starts
        assert time.monotonic() < deadline and d.proc.poll() is None, d.log()
        time.sleep(0.001)
    mnt.rmdir()
    assert d.proc.wait(30) == 1, d.log()
    (failed,) = d.events("daemon_failed")
    assert failed["level"] == "critical" and failed["error"].startswith("RuntimeError")
    assert "Traceback" in failed["exception"]
    assert not any(line.startswith("Traceback") for line in d.log().splitlines())
    assert d.events("simulation_stopped") and not d.events("mounted")
    assert not is_mounted(mnt)


def run_refused(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "mmud", "run", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr
    return done


def test_refused_mount_points(workdir):
    a_file = workdir / "a-file"
    a_file.write_text("x")
    assert "not a directory" in run_refused("--mount", str(a_file)).stderr
    full = workdir / "full"
    full.mkdir()
    (full / "something").write_text("x")
    assert "not empty" in run_refused("--mount", str(full)).stderr


def test_refused_arguments(workdir):
    mnt = str(workdir / "args")
    assert "no_such" in run_refused("--mount", mnt, "--param", "no_such=1").stderr
    assert "mmu_audit" in run_refused("--mount", mnt, "--param", "mmu_audit=y").stderr
    assert "invalid size" in run_refused("--mount", mnt, "--mem", "lots").stderr
    assert "bogus" in run_refused("--mount", mnt, "--workload", "bogus").stderr
    assert not is_mounted(mnt)


def test_load_time_parameters(workdir):
    d = Daemon(workdir / "load", "--param", "mmio_caching=0", "--param", "mmu_audit=1",
               "--param", "page_fault_stack").start()
    try:
        assert cat(d.path("parameters/mmio_caching")) == "N\n"
        assert cat(d.path("parameters/mmu_audit")) == "Y\n"
        assert cat(d.path("kvm/mmu-debug")) == "1\n"
        assert cat(d.path("parameters/page_fault_stack")) == "Y\n"
    finally:
        assert d.stop() == 0


def test_notify_protocol(workdir):
    path = str(workdir / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        d = Daemon(workdir / "notify", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        d.start(wait=False)
        seen: list[str] = []

        def until(line: str) -> None:
            while line not in seen:
                seen.extend(sock.recv(4096).decode().splitlines())

        until("READY=1")
        assert is_mounted(d.mount)  # READY=1 only once the mount is visible
        until("WATCHDOG=1")
        assert any(s.startswith("STATUS=") for s in seen)
        assert d.stop() == 0
        until("STOPPING=1")


def test_systemd_unit_verifies():
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run([analyze, "verify", str(REPO / "systemd/mmud.service")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_make_run_and_the_systemd_unit_load_isolation_on():
    """address_space_isolation defaults to N (0444, as in the RFC); the two ways the project
    starts the service pass =1, so kvm/fault_log has faults to show out of the box."""
    makefile = (REPO / "Makefile").read_text()
    run = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "--param address_space_isolation=1" in run
    unit = (REPO / "systemd" / "mmud.service").read_text()
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert "--param address_space_isolation=1" in exec_start
