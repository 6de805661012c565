"""Record and replay (docs/replay.md): a daemon run driven through a real mount, with writes
of every kind at random wall-clock moments, replays identically offline — audit_log and
fault_log text included; a tampered recording, a newer format and a recording cut short by
a full disk are each handled as documented.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmud.daemon.mountpoint import is_mounted
from mmud.daemon.replay import Replay, read
from tests.fusemount import REPO, Daemon, cat, echo, shell_write, status_fields, wait_for
from tests.test_state_dir import fill, tiny  # noqa: F401 - the tiny tmpfs fixture

PAGE = 4096
HIGH = 30 << 20  # guest RAM the guest kernel rarely allocates (a 32 MiB VM)


def replay_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmud", "replay", *map(str, args)],
                          capture_output=True, text=True, check=False, cwd=REPO, timeout=120)


def recording_of(state: Path) -> Path:
    (path,) = (state / "recordings").iterdir()
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def memory_write(d: Daemon, gpa: int, data: bytes) -> None:
    fd = os.open(d.path("vm0/memory"), os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, gpa) == len(data)
    finally:
        os.close(fd)


def write(d: Daemon, rel: str, text: str) -> None:
    done = shell_write(d.path(rel), text + "\n")
    assert done.returncode == 0, (rel, text, done.stderr)


def drive(d: Daemon, rng: random.Random) -> None:
    """Writes of every kind, each after a random pause."""
    def toggle_audit() -> None:
        write(d, "parameters/mmu_audit", rng.choice("01"))

    def dirty_read(slot: int = 0) -> None:
        assert len(d.path(f"vm0/dirty_log/{slot}").read_bytes()) > 0

    actions = [
        lambda: write(d, "parameters/mmu_audit", "1"),
        lambda: write(d, "parameters/mmu_audit_ratelimit_ms", "0"),
        lambda: write(d, "vm0/inject", "sync_skipped"),  # armed: the audit reports it
        lambda: wait_for(lambda: "error" in d.read("kvm/audit_log"), 30, "the audit's report"),
        toggle_audit, toggle_audit,
        lambda: write(d, "vm0/inject", "none"),
        lambda: write(d, "parameters/mmu_audit", "1"),
        lambda: write(d, "vm0/memslots", "add 9 0x100000000 0x10000"),
        lambda: write(d, "vm0/memslots", "move 9 0x200000000"),
        lambda: write(d, "vm0/memslots", "flags 9 log_dirty=1"),
        lambda: dirty_read(9),
        lambda: write(d, "vm0/memslots", "delete 9"),
        lambda: write(d, "vm0/zap_all", "fast"),
        lambda: memory_write(d, HIGH, b"replay" * 100),
        lambda: write(d, "vm0/memslots", "flags 0 log_dirty=1"),
        dirty_read,  # while running
        lambda: write(d, "vm0/state", "pause"),
        dirty_read,  # while paused
        lambda: memory_write(d, HIGH + 3 * PAGE, os.urandom(3 * PAGE)),
        lambda: write(d, "vm0/state", "run"),
        lambda: write(d, "vm0/memslots", "flags 0 log_dirty=0"),
        lambda: write(d, "vm0/zap_all", "slow"),
        lambda: write(d, "kvm/pf_fixed", "0"),
        lambda: write(d, "kvm/isolation/map", "mmu_page_hash"),
        lambda: write(d, "vm0/inject", "write_protect_skipped"),
        toggle_audit,
        lambda: write(d, "vm0/inject", "none"),
        lambda: write(d, "parameters/mmu_audit_ratelimit_ms", "5000"),
        lambda: write(d, "vm0/zap_all", "fast"),
        toggle_audit,
        lambda: memory_write(d, HIGH + 8 * PAGE, b"\xff" * 77),
    ]
    for act in actions:
        time.sleep(rng.uniform(0, 0.06))
        act()
    # A live migration: the source pauses at its end; then it runs on.
    write(d, "vm0/migrate", "start")
    wait_for(lambda: "result:" in d.read("vm0/migrate"), 30, "the migration")
    write(d, "vm0/state", "run")
    time.sleep(rng.uniform(0.3, 0.6))
    write(d, "vm0/zap_all", "slow")


@pytest.fixture(scope="module")
def recorded(workdir: Path) -> Iterator[dict]:
    """One recorded daemon run, paused at its end: what the files showed, and its recording."""
    state = workdir / "state"
    d = Daemon(workdir / "rec", "--seed", "5", "--mem", "32M", "--vcpus", "2",
               "--param", "address_space_isolation=1", "--state-dir", str(state)).start()
    try:
        drive(d, random.Random(15))
        # Long enough for a periodic checkpoint (recording.CHECKPOINT_STEPS) before the end.
        wait_for(lambda: int(status_fields(d.read("vm0/status"))["steps"]) > 52_000, 30,
                 "a checkpoint")
        write(d, "vm0/state", "pause")
        seen = {"audit_log": d.read("kvm/audit_log"), "fault_log": d.read("kvm/fault_log"),
                "status": d.read("vm0/status"), "recording": d.path("vm0/recording").read_bytes(),
                "mode": stat.S_IMODE(d.path("vm0/recording").stat().st_mode)}
        assert d.stop() == 0, d.log()
        seen["path"] = recording_of(state)
        yield seen
    finally:
        if d.proc.poll() is None:
            d.stop()


def test_a_daemon_run_replays_identically(recorded: dict) -> None:
    path = recorded["path"]
    requests = [line["op"] for line in lines(path)
                if "op" in line and line["op"] not in ("precopy", "crash", "paused")]
    assert len(requests) >= 30
    recorded_ops = {line["op"] for line in lines(path) if "op" in line}
    assert {"param", "inject", "memslot", "zap_all", "dirty_log", "migrate", "precopy",
            "memory_write", "state", "clear_stat", "isolation_map"} <= recorded_ops
    replay = Replay(path)
    outcome = replay.run()
    final = lines(path)[-2]  # vm0's final checkpoint, then vm1's
    assert outcome.render().startswith(f"identical through step {final['steps']['vm0']} ("), \
        outcome.render()  # what `mmud replay` prints (exit 0)
    assert outcome.complete and outcome.checkpoints >= 3  # a periodic one, and the 2 final
    module = replay.sim.module
    audit = "".join(module.audit.lines)
    assert "error" in audit  # the armed bugs were caught while the audit was on
    assert audit.rstrip("\n") == recorded["audit_log"].rstrip("\n")
    fault_log = "\n".join(module.isolation.log.lines)
    assert fault_log and fault_log.rstrip("\n") == recorded["fault_log"].rstrip("\n")


def test_status_and_the_recording_file(recorded: dict) -> None:
    """vm0/status names the file; vm0/recording read through the mount is the file so far."""
    assert status_fields(recorded["status"])["recording"] == str(recorded["path"])
    assert recorded["mode"] == 0o444
    copy = recorded["recording"]
    whole = recorded["path"].read_bytes()
    assert copy and whole.startswith(copy) and copy.endswith(b"\n")
    assert b'"final":true' in whole[len(copy):]  # the stop added the final checkpoints


def test_a_tampered_step_is_a_divergence_at_the_next_checkpoint(recorded: dict,
                                                                tmp_path: Path) -> None:
    records = lines(recorded["path"])
    # A zap moved earlier, to where the line before it was applied.
    i = next(i for i, r in enumerate(records[1:], 1)
             if r.get("op") == "zap_all" and records[i - 1]["steps"].get("vm0", 0) < r["steps"]["vm0"]
             and "op" in records[i - 1])
    records[i]["steps"] = dict(records[i - 1]["steps"])
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("".join(json.dumps(r) + "\n" for r in records))
    checkpoint = next(r for r in records[i:] if "checkpoint" in r)
    done = replay_cli(tampered)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith(
        f"divergence at checkpoint {checkpoint['seq']} ({checkpoint['checkpoint']}, "
        f"step {checkpoint['steps'][checkpoint['checkpoint']]}): "), done.stdout
    assert "last event before it: seq" in done.stdout


def test_a_newer_major_version_is_refused(recorded: dict, tmp_path: Path) -> None:
    records = lines(recorded["path"])
    records[0]["version"] = "2.0"
    newer = tmp_path / "newer.jsonl"
    newer.write_text("".join(json.dumps(r) + "\n" for r in records))
    done = replay_cli(newer)
    assert done.returncode == 2
    assert "version 2.0 is newer than this mmud reads (1.1)" in done.stderr, done.stderr
    records[0]["version"] = "1.7"  # a newer minor version only adds fields: read
    newer.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read(newer) == (records[0], records[1:])


def test_a_full_disk_stops_the_recording_not_the_run(workdir: Path, tiny: Path) -> None:  # noqa: F811
    d = Daemon(workdir / "full", "--seed", "6", "--mem", "16M", "--state-dir", str(tiny)).start()
    try:
        write(d, "parameters/mmu_audit", "1")
        write(d, "vm0/zap_all", "fast")
        path = recording_of(tiny)
        wait_for(lambda: b'"checkpoint"' in path.read_bytes(), 30, "a checkpoint")
        write(d, "vm0/inject", "sync_skipped")
        fill(tiny)
        # Lines go on filling the file's last page; one of these memory writes (a line of
        # about 4 KiB each) finds the disk full.  Each succeeds all the same: the run goes on.
        for i in range(3):
            memory_write(d, (15 << 20) + i * PAGE, os.urandom(3000))
        write(d, "parameters/mmu_audit", "0")
        assert cat(d.path("parameters/mmu_audit")) == "N\n"
        status = status_fields(d.read("vm0/status"))
        assert status["recording"] == f"{path} (stopped: write failed: ENOSPC)"
        assert echo(d.path("vm0/state"), "pause").returncode == 0
        assert d.stop() == 0, d.log()
    finally:
        if d.proc.poll() is None:
            d.stop()
    stopped = d.events("recording_stopped")
    assert len(stopped) == 1 and stopped[0]["errno"] == 28, stopped
    data = path.read_bytes()
    assert data.endswith(b"\n")  # whole lines only
    done = replay_cli(path)
    assert done.returncode == 0, done.stdout + done.stderr
    last = [r for r in lines(path) if "checkpoint" in r][-1]
    assert done.stdout.startswith(f"identical through step {last['steps']['vm0']} "), done.stdout
    assert "cut short" in done.stdout


def test_mount_serves_the_replayed_vms_paused(recorded: dict, workdir: Path) -> None:
    """`--mount` with `--until`: the files show the run as it was at that step."""
    records = lines(recorded["path"])
    added = next(r for r in records if r.get("op") == "memslot" and r["args"]["action"] == "add")
    until = added["steps"]["vm0"]
    mount = workdir / "replayed"
    proc = subprocess.Popen([sys.executable, "-m", "mmud", "replay", str(recorded["path"]),
                             "--until", str(until), "--mount", str(mount), "--log-level", "info"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for(lambda: is_mounted(mount) or proc.poll() is not None, 60, "the mount")
        assert cat(mount / "vm0/state") == "paused\n"
        assert status_fields(cat(mount / "vm0/status"))["steps"] == str(until)
        assert "  9 0x0000000100000000" in cat(mount / "vm0/memslots")  # the add at that step
        assert cat(mount / "vms").splitlines()[0].startswith("vm0 paused")
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=10)[0].decode()
    assert proc.returncode == 0, out
    assert "replay_finished" in out and f"stopped at step {until}" in out
