"""kvm/ statistics through a real mount: moving counters, clearing, gauges, per-VM directory."""

import os
import re
import stat
import time

import pytest

from mmud.uapi.stats import STATS, Kind
from tests.fusemount import assert_refused, cat, echo, shell_write, wait_for


def test_every_stat_has_a_file_with_the_kernel_mode(daemon):
    vm_dir = daemon.per_vm_dir()
    for desc in STATS:
        for rel in (f"kvm/{desc.name}", f"kvm/{vm_dir}/{desc.name}"):
            st = os.stat(daemon.path(rel))
            assert stat.S_IMODE(st.st_mode) == (0o444 if desc.kind is Kind.INSTANT else 0o644)
            assert re.fullmatch(r"\d+\n", daemon.read(rel))


def test_per_vm_directory_is_named_pid_fd(daemon):
    pid, fd = map(int, daemon.per_vm_dir().split("-"))
    assert pid != daemon.proc.pid  # the simulation process, not the FUSE one
    assert os.path.exists(f"/proc/{pid}/fd/{fd}")


def test_huge_page_gauges_read_0(daemon):
    """v5.16's page-size gauges: mmud's host backing has no huge pages, so no huge sptes."""
    vm_dir = daemon.per_vm_dir()
    for name in ("pages_2m", "pages_1g", "nx_lpage_splits"):
        assert cat(daemon.path(f"kvm/{name}")) == "0\n"
        assert cat(daemon.path(f"kvm/{vm_dir}/{name}")) == "0\n"
    assert "mmu_pte_updated" not in os.listdir(daemon.path("kvm"))


def test_status_shows_the_pid_of_the_per_vm_directory(daemon):
    pid, _ = daemon.per_vm_dir().split("-")
    fields = dict(line.split(":", 1) for line in daemon.read("vm0/status").splitlines())
    assert fields["pid"].strip() == pid


def test_stats_move_while_the_vm_runs(daemon):
    before = int(daemon.read("kvm/exits"))
    wait_for(lambda: int(daemon.read("kvm/exits")) > before, 10, "exits to grow")


def test_clear_cumulative_stat(daemon):
    wait_for(lambda: int(daemon.read("kvm/exits")) > 1000, 10, "exits to pass 1000")
    assert echo(daemon.path("kvm/exits"), "0").returncode == 0
    assert int(daemon.read("kvm/exits")) < 1000
    for text in ("00", "0x0", "0\n"):
        assert shell_write(daemon.path("kvm/exits"), text).returncode == 0


@pytest.mark.parametrize("text", ["5", "0\n\n"])  # the whole matrix: tests/test_fs_tree.py
def test_clear_refuses_anything_but_zero(daemon, text):
    assert_refused(shell_write(daemon.path("kvm/exits"), text))


def test_clear_per_vm_stat(daemon):
    rel = f"kvm/{daemon.per_vm_dir()}/pf_fixed"
    wait_for(lambda: int(daemon.read(rel)) > 1000, 10, "pf_fixed to pass 1000")
    assert echo(daemon.path(rel), "0").returncode == 0
    assert int(daemon.read(rel)) < 1000
    assert_refused(shell_write(daemon.path(rel), "5"))


def test_gauges_are_read_only_for_root(daemon):
    gauges = [s.name for s in STATS if s.kind is Kind.INSTANT]
    for name in gauges:
        done = echo(daemon.path(f"kvm/{name}"), "0")
        assert done.returncode != 0 and "Permission denied" in done.stderr


def test_top_level_is_the_sum_over_vms(daemon):
    vm_dir = daemon.per_vm_dir()
    assert echo(daemon.path("vm0/state"), "pause").returncode == 0
    try:
        time.sleep(0.1)
        for desc in STATS:
            assert daemon.read(f"kvm/{desc.name}") == daemon.read(f"kvm/{vm_dir}/{desc.name}")
    finally:
        assert echo(daemon.path("vm0/state"), "run").returncode == 0
