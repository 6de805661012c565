"""kvm/fault_log and kvm/isolation/ through a real mount, with a state directory."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time

import pytest

from tests.fusemount import Daemon, assert_refused, echo, serving, shell_write, wait_for

ENTRY = "KVM isolation: page fault #"
ON = ("--param", "address_space_isolation=1")  # explicit: the default may change


@pytest.fixture(scope="module")
def iso(workdir):
    yield from serving(workdir / "iso", *ON, "--state-dir", str(workdir / "state"), "--seed", "3")


def entry_lines(d: Daemon) -> list[str]:
    return [line for line in d.read("kvm/fault_log").splitlines() if ENTRY in line]


def test_fresh_daemon_logs_within_a_second(iso):
    deadline = time.monotonic() + 1.0
    wait_for(lambda: entry_lines(iso), 1.0, "a fault_log entry")
    assert time.monotonic() <= deadline
    text = iso.read("kvm/fault_log")
    assert "Call Trace:" in text
    ips = [line.split(" at ")[1].split(" on ")[0] for line in entry_lines(iso)]
    assert len(ips) == len(set(ips))


def test_modes(iso):
    def mode(rel: str) -> int:
        return stat.S_IMODE(os.stat(iso.path(rel)).st_mode)

    assert (mode("kvm/fault_log"), mode("kvm/isolation/map"), mode("kvm/isolation/mappings"),
            mode("kvm/isolation/faults"), mode("kvm/isolation/history")) == \
        (0o444, 0o200, 0o444, 0o444, 0o444)
    assert int(iso.read("kvm/isolation_faults")) > 0


def faults_table(d: Daemon) -> list[list[str]]:
    header, *rows = d.read("kvm/isolation/faults").splitlines()
    assert header.split() == ["entry", "ip", "address", "object", "count"]
    return [row.split() for row in rows]


def test_cat_faults_shows_the_table_of_logged_faults(iso):
    wait_for(lambda: entry_lines(iso) and faults_table(iso), 5, "a faults row")
    log = entry_lines(iso)
    wait_for(lambda: len(faults_table(iso)) >= len(log), 5, "the table to catch up")
    rows = faults_table(iso)
    for line, (n, ip, address, obj, count) in zip(log, rows, strict=False):
        kernel = line.split("] ", 1)[1]
        assert kernel.startswith(f"KVM isolation: page fault #{n} (")
        assert f" at {ip} [kvm] on {address} (0x{address.lstrip('0')})" in kernel  # %pS: bare
        assert "+0x" in obj and int(count) >= 1
    before = {row[0]: int(row[4]) for row in rows}

    def grown() -> bool:
        return any(int(row[4]) > before.get(row[0], 1 << 62) for row in faults_table(iso))

    wait_for(grown, 5, "a count to grow as its IP faults again")


def test_faults_refuses_a_write_with_eacces(iso):
    done = subprocess.run(["sh", "-c", 'echo x > "$0"', str(iso.path("kvm/isolation/faults"))],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "Permission denied" in done.stderr, done


def test_map_a_symbol_then_mappings_show_it(iso):
    assert echo(iso.path("kvm/isolation/map"), "mmu_page_hash").returncode == 0
    assert any(line.endswith(" mmu_page_hash") for line in
               iso.read("kvm/isolation/mappings").splitlines())
    assert shell_write(iso.path("kvm/isolation/map"), "ffff888103300000 10\n").returncode == 0
    for bad in ("no_such_symbol", "1 2 3", "ffff888100000000 0", "kvm kvm"):
        assert_refused(shell_write(iso.path("kvm/isolation/map"), bad))


def test_restart_clears_the_log_and_the_history_keeps_it(iso, workdir):
    wait_for(lambda: entry_lines(iso), 5, "entries")
    assert echo(iso.path("vm0/state"), "pause").returncode == 0
    before = entry_lines(iso)
    assert echo(iso.path("vm0/state"), "restart").returncode == 0
    assert entry_lines(iso) == []
    history = workdir / "state" / "fault_log.jsonl"
    records = [json.loads(line) for line in history.read_text().splitlines()]
    kept = [line for r in records for line in r["lines"] if ENTRY in line]
    assert set(before) <= set(kept)
    assert records[0]["vm"] == "vm0" and records[0]["seed"] == 3
    # kvm/isolation/history keeps the rows the restart cleared from kvm/isolation/faults
    shown = {(row.split()[1], row.split()[3]) for row in iso.read("kvm/isolation/history").splitlines()[1:]}
    assert {("vm0", r["ip"]) for r in records if "ip" in r} <= shown
    assert {line.split(" at ")[1].split(" [kvm]")[0] for line in before} <= {ip for _, ip in shown}
    assert '"event": "isolation_fault"' in iso.log()
    # mmu_page_hash is mapped now: the fresh VM never faults on it.
    assert echo(iso.path("vm0/state"), "run").returncode == 0
    wait_for(lambda: len(entry_lines(iso)) >= 2, 5, "new entries")
    time.sleep(0.3)
    assert "(mmu_page_hash+" not in iso.read("kvm/fault_log")


def test_page_fault_stack_off(workdir):
    d = Daemon(workdir / "nostack", *ON, "--param", "page_fault_stack=N").start()
    try:
        wait_for(lambda: entry_lines(d), 5, "entries")
        assert "Call Trace:" not in d.read("kvm/fault_log")
        assert d.read("parameters/page_fault_stack") == "N\n"
    finally:
        assert d.stop() == 0, d.log()
