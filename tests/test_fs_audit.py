"""The audit through a real mount: `echo 1 > parameters/mmu_audit`, vm0/inject, kvm/audit_log."""

from __future__ import annotations

import stat

import pytest

from tests.fusemount import Daemon, assert_refused, cat, echo, serving, shell_write, wait_for


@pytest.fixture(scope="module")
def audited(workdir):
    yield from serving(workdir / "audit", "--seed", "2", "--param", "mmu_audit_ratelimit_ms=0",
               "--param", "mmu_audit_scope=incremental")


def stat_value(d: Daemon, name: str) -> int:
    return int(d.read(f"kvm/{name}"))


def test_inject_file_lists_bugs_and_arms_one(audited):
    assert stat.S_IMODE(audited.path("vm0/inject").stat().st_mode) == 0o644
    text = audited.read("vm0/inject")
    assert text.startswith("[none] rmap_add_skipped ") and text.endswith("isolation_switch_fault\n")
    assert_refused(shell_write(audited.path("vm0/inject"), "no_such_bug\n"))
    assert audited.read("vm0/inject") == text
    assert echo(audited.path("vm0/inject"), "none").returncode == 0


def test_echo_1_turns_the_audit_on_and_an_armed_bug_shows_in_audit_log(audited):
    assert stat.S_IMODE(audited.path("kvm/audit_log").stat().st_mode) == 0o444
    assert audited.read("kvm/audit_log") == ""
    assert echo(audited.path("parameters/mmu_audit"), "1").returncode == 0
    wait_for(lambda: stat_value(audited, "mmu_audit_runs") > 0, 5, "audit runs")
    assert audited.read("kvm/audit_log") == "" and stat_value(audited, "mmu_audit_errors") == 0
    assert echo(audited.path("vm0/inject"), "wrong_pfn").returncode == 0
    assert "[wrong_pfn]" in audited.read("vm0/inject")
    wait_for(lambda: "error: levels 4 pfn " in cat(audited.path("kvm/audit_log")), 10, "a report")
    line = next(x for x in audited.read("kvm/audit_log").splitlines() if "levels 4 pfn" in x)
    assert line.startswith("audit: (post page fault) error: levels 4 pfn ") and line.endswith("n")
    assert stat_value(audited, "mmu_audit_errors") > 0
    assert echo(audited.path("vm0/inject"), "none").returncode == 0
    assert echo(audited.path("kvm/mmu-debug"), "0").returncode == 0
    assert audited.read("parameters/mmu_audit") == "N\n"
