"""tracing/ through a real mount (docs/tracing.md): the tracefs files of Linux v5.16 with
`echo`, `cat` and `head`, on a daemon with address-space isolation off (the default)."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import time
from collections import Counter

import pytest

from tests.fusemount import Daemon, assert_refused, cat, echo, serving, shell_write, wait_for

ALL = "kvmmmu:*"
LINE = re.compile(r"^\s*(\S+)-(\d+)\s+\[(\d{3})\] (\S{5})\s+(\d+\.\d{6}): (\w+): (.*)$")


@pytest.fixture(scope="module")
def d(workdir):
    yield from serving(workdir / "tracing", "--seed", "3", "--param", "address_space_isolation=0")


@pytest.fixture(autouse=True)
def reset(d):
    """Each test starts with every event off, no filters, tracing on, an empty buffer."""
    yield
    t = d.path("tracing")
    subprocess.run(["sh", "-c", 'echo 0 > "$0"/events/enable; echo 1 > "$0"/tracing_on; '
                    'echo 1408 > "$0"/buffer_size_kb; echo > "$0"/trace', str(t)], check=True)
    for system in ("kvmmmu", "kvm"):
        for name in os.listdir(t / "events" / system):
            if name != "enable":
                assert echo(t / f"events/{system}/{name}/filter", "0").returncode == 0


def entries(text: str) -> list[re.Match[str]]:
    return [m for line in text.splitlines() if (m := LINE.match(line))]


def sh(cmd: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", cmd, "sh", *args], capture_output=True, text=True,
                          check=False)


def zap(d: Daemon) -> None:
    assert echo(d.path("vm0/zap_all"), "fast").returncode == 0


def test_available_events_and_set_event_truncate_vs_append(d):
    t = d.path("tracing")
    avail = cat(t / "available_events").splitlines()
    assert "kvmmmu:kvm_mmu_get_page" in avail and "kvm:kvm_exit" in avail and len(avail) == 22
    assert sorted(os.listdir(t / "events")) == ["enable", "kvm", "kvmmmu"]
    for system in ("kvm", "kvmmmu"):
        assert sorted(os.listdir(t / "events" / system)) == sorted(
            ["enable", *(a.split(":")[1] for a in avail if a.startswith(f"{system}:"))])
    assert cat(t / "set_event") == ""
    assert cat(t / "events/kvmmmu/enable") == "0\n"
    assert echo(t / "set_event", "kvmmmu:kvm_mmu_get_page").returncode == 0
    assert sh('echo kvmmmu:kvm_mmu_set_spte >> "$1"', str(t / "set_event")).returncode == 0
    assert cat(t / "set_event") == "kvmmmu:kvm_mmu_get_page\nkvmmmu:kvm_mmu_set_spte\n"
    assert cat(t / "events/kvmmmu/enable") == "X\n" and cat(t / "events/enable") == "X\n"
    assert cat(t / "events/kvmmmu/kvm_mmu_get_page/enable") == "1\n"
    assert echo(t / "set_event", "kvmmmu:kvm_mmu_sync_page").returncode == 0  # > clears first
    assert cat(t / "set_event") == "kvmmmu:kvm_mmu_sync_page\n"
    assert sh('echo "!kvmmmu:kvm_mmu_sync_page" >> "$1"', str(t / "set_event")).returncode == 0
    assert cat(t / "set_event") == ""
    assert_refused(shell_write(t / "set_event", "kvmmmu:no_such_event\n"))
    assert echo(t / "set_event", ALL).returncode == 0
    assert cat(t / "events/kvmmmu/enable") == "1\n" and len(cat(t / "set_event").splitlines()) == 16
    assert cat(t / "events/kvm/enable") == "0\n" and cat(t / "events/enable") == "X\n"
    assert echo(t / "events/kvm/enable", "1").returncode == 0
    assert cat(t / "events/enable") == "1\n" and len(cat(t / "set_event").splitlines()) == 22
    assert sh('echo "!kvm:*" >> "$1"', str(t / "set_event")).returncode == 0
    assert cat(t / "events/kvm/enable") == "0\n"
    assert_refused(shell_write(t / "events/kvmmmu/enable", "2\n"))
    assert_refused(shell_write(t / "events/kvmmmu/kvm_mmu_get_page/enable", "y\n"))
    assert cat(t / "events/kvmmmu/enable") == "1\n"


def test_one_event_enabled_shows_only_it_in_trace(d):
    t = d.path("tracing")
    assert echo(t / "events/kvmmmu/kvm_mmu_get_page/enable", "1").returncode == 0
    zap(d)
    wait_for(lambda: entries(cat(t / "trace")), 10, "trace entries")
    text = cat(t / "trace")
    head = text.splitlines()
    assert head[0] == "# tracer: nop" and head[1] == "#"
    m = re.fullmatch(r"# entries-in-buffer/entries-written: (\d+)/(\d+)   #P:(\d+)", head[2])
    assert m is not None and int(m[1]) > 0 and int(m[1]) <= int(m[2])
    assert head[11].startswith("#              | |")
    lines = entries(text)
    assert len(lines) == len(head) - 12
    assert {x[6] for x in lines} == {"kvm_mmu_get_page"}
    assert cat(t / "trace")[: len(head[0])] == head[0]  # reading does not consume
    assert entries(cat(t / "trace"))
    assert echo(t / "tracing_on", "0").returncode == 0
    assert sh('echo > "$1"', str(t / "trace")).returncode == 0
    assert entries(cat(t / "trace")) == []


def test_kvm_exit_lines_through_the_mount(d):
    """`echo kvm:kvm_exit kvm:kvm_page_fault > set_event`: a #PF exit and its fault, in the
    kernel's text, with the vCPU's guest-switch flags (irqs off, preempt depth 1)."""
    t = d.path("tracing")
    assert echo(t / "set_event", "kvm:kvm_exit kvm:kvm_page_fault").returncode == 0
    zap(d)  # the vCPUs fault their shadow tables back in
    wait_for(lambda: any(x[6] == "kvm_page_fault" for x in entries(cat(t / "trace"))), 10,
             "kvm_page_fault lines")
    lines = entries(cat(t / "trace"))
    assert {x[6] for x in lines} == {"kvm_exit", "kvm_page_fault"}
    exits = [x for x in lines if x[6] == "kvm_exit"]
    assert all(x[4] == "d..1." and x[1].startswith("vcpu") for x in exits)
    assert all(re.fullmatch(r"vcpu \d+ reason (EXCEPTION_NMI|CR_ACCESS|INVLPG|MSR_WRITE) rip 0x0 "
                            r"info1 0x[0-9a-f]{16} info2 0x0{16} intr_info 0x[0-9a-f]{8} "
                            r"error_code 0x[0-9a-f]{8}", x[7]) for x in exits)
    faults = [x for x in lines if x[6] == "kvm_page_fault"]
    assert all(re.fullmatch(r"address [0-9a-f]+ error_code [0-9a-f]+", x[7]) for x in faults)
    fmt = cat(t / "events/kvm/kvm_page_fault/format")
    assert fmt.splitlines()[-1] == ('print fmt: "address %lx error_code %x", REC->fault_address, '
                                    'REC->error_code')


def test_format_parses_and_matches_the_lines(d):
    t = d.path("tracing")
    fmt = cat(t / "events/kvmmmu/kvm_mmu_spte_requested/format")
    assert fmt.startswith("name: kvm_mmu_spte_requested\nID: ")
    fields = re.findall(r"\tfield:([^;]+) (\w+);\toffset:(\d+);\tsize:(\d+);\tsigned:([01]);", fmt)
    names = [f[1] for f in fields]
    assert names[:4] == ["common_type", "common_flags", "common_preempt_count", "common_pid"]
    assert fmt.splitlines()[-1].startswith('print fmt: "gfn %llx pfn %llx level %d", REC->gfn')
    assert echo(t / "events/kvmmmu/kvm_mmu_spte_requested/enable", "1").returncode == 0
    zap(d)
    wait_for(lambda: entries(cat(t / "trace")), 10, "trace entries")
    text = entries(cat(t / "trace"))[0][7]
    assert text.split()[0::2] == names[4:]  # "gfn X pfn Y level Z"


def test_filter_keeps_matching_lines_and_a_bad_one_is_einval(d):
    t = d.path("tracing")
    flt = t / "events/kvmmmu/kvm_mmu_get_page/filter"
    assert cat(flt) == "none\n"
    assert echo(t / "events/kvmmmu/kvm_mmu_get_page/enable", "1").returncode == 0
    zap(d)
    wait_for(lambda: entries(cat(t / "trace")), 10, "trace entries")
    gfn = re.search(r" gfn (\w+) l4 ", cat(t / "trace"))
    assert gfn is not None
    assert echo(flt, f"'gfn == 0x{gfn[1]}'").returncode == 0
    assert cat(flt) == f"gfn == 0x{gfn[1]}\n"
    assert sh('echo > "$1"', str(t / "trace")).returncode == 0
    zap(d)
    wait_for(lambda: entries(cat(t / "trace")), 10, "filtered entries")
    assert {re.search(r" gfn (\w+) ", x[7])[1] for x in entries(cat(t / "trace"))} == {gfn[1]}
    # A filter that does not parse: EINVAL, the event unfiltered, the error in the file.
    assert_refused(shell_write(flt, "gfn === 1\n"))
    assert cat(flt).startswith("gfn === 1\n") and "\nparse_error: " in cat(flt)
    assert_refused(shell_write(flt, "no_field == 1\n"))
    assert cat(flt) == "no_field == 1\n^\nparse_error: Field not found\n\n"
    assert sh('echo > "$1"', str(t / "trace")).returncode == 0
    zap(d)
    wait_for(lambda: len({re.search(r" gfn (\w+) ", x[7])[1]
                          for x in entries(cat(t / "trace"))}) > 1, 10, "unfiltered entries")
    assert echo(flt, "0").returncode == 0 and cat(flt) == "none\n"


def test_trace_pipe_delivers_a_fresh_event_within_100ms(d):
    t = d.path("tracing")
    assert echo(t / "events/kvmmmu/kvm_mmu_zap_all_fast/enable", "1").returncode == 0
    fd = os.open(t / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(BlockingIOError):
            os.read(fd, 4096)  # EAGAIN: nothing there
    finally:
        os.close(fd)
    reader = subprocess.Popen(["head", "-n", "1", str(t / "trace_pipe")], stdout=subprocess.PIPE,
                              text=True)
    time.sleep(0.5)
    assert reader.poll() is None  # blocked: no event yet
    t0 = time.monotonic()
    zap(d)
    out, _ = reader.communicate(timeout=5)
    latency = time.monotonic() - t0
    assert "kvm_mmu_zap_all_fast: kvm-mmu-valid-gen" in out
    assert latency < 0.1, latency


def test_two_readers_never_see_the_same_line(d):
    """Two concurrent readers drain a stopped buffer: together they read exactly the lines
    `trace` shows, each once (identical texts may occur, so multisets are compared)."""
    t = d.path("tracing")
    assert echo(t / "events/enable", "1").returncode == 0
    wait_for(lambda: len(entries(cat(t / "trace"))) > 5000, 20, "a full buffer")
    assert echo(t / "tracing_on", "0").returncode == 0
    expected = Counter(m[0] for m in entries(cat(t / "trace")))
    readers = [subprocess.Popen(["dd", f"if={t / 'trace_pipe'}", "iflag=nonblock", "bs=4096",
                                 "status=none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outs = [r.communicate(timeout=60) for r in readers]
    assert all("Resource temporarily unavailable" in err for _, err in outs)  # EAGAIN at the end
    got = [Counter(m[0] for m in entries(out)) for out, _ in outs]
    assert all(got)  # both readers took lines
    assert got[0] + got[1] == expected


def test_small_buffer_overflows_and_shows_lost(d):
    t = d.path("tracing")
    assert echo(t / "buffer_size_kb", "4").returncode == 0
    assert cat(t / "buffer_size_kb") == "4\n"
    assert_refused(shell_write(t / "buffer_size_kb", "0\n"))
    assert echo(t / "events/enable", "1").returncode == 0
    time.sleep(0.5)
    out = sh('head -n 200 "$1"', str(t / "trace_pipe")).stdout
    assert re.search(r"^CPU:\d+ \[LOST \d+ EVENTS\]$", out, re.M), out[:500]


def test_tracing_on_0_stops_recording(d):
    t = d.path("tracing")
    assert cat(t / "tracing_on") == "1\n"
    assert echo(t / "tracing_on", "0").returncode == 0
    assert cat(t / "tracing_on") == "0\n"
    assert echo(t / "events/enable", "1").returncode == 0
    zap(d)
    time.sleep(0.3)
    assert entries(cat(t / "trace")) == []
    fd = os.open(t / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(OSError) as e:
            os.read(fd, 4096)
        assert e.value.errno == errno.EAGAIN
    finally:
        os.close(fd)
    assert echo(t / "tracing_on", "1").returncode == 0
    wait_for(lambda: entries(cat(t / "trace")), 10, "recording again")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_killed_blocked_reader_stops_reading(d, sig):
    """A `cat trace_pipe` blocked on an empty buffer and then killed gives up its read (the
    kernel interrupts the FUSE request): the next event stays in the buffer for the next
    reader instead of going to the dead one."""
    t = d.path("tracing")
    reader = subprocess.Popen(["cat", str(t / "trace_pipe")], stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    assert reader.poll() is None  # blocked: every event is off
    reader.send_signal(sig)
    assert reader.wait(5) == -sig
    time.sleep(0.1)
    assert echo(t / "events/kvmmmu/kvm_mmu_zap_all_fast/enable", "1").returncode == 0
    zap(d)
    time.sleep(0.3)  # a dead reader still polling would take the line within 5 ms
    assert [x[6] for x in entries(cat(t / "trace"))] == ["kvm_mmu_zap_all_fast"]
    fd = os.open(t / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert b"kvm_mmu_zap_all_fast: " in os.read(fd, 4096)
    finally:
        os.close(fd)


def test_per_cpu_stats_count_the_cpus_events(d):
    """per_cpu/cpu0/stats has the kernel's fields; entries grow as events are recorded and
    `read events` as trace_pipe consumes them."""
    t = d.path("tracing")
    stats = t / "per_cpu/cpu0/stats"

    def fields() -> dict[str, str]:
        return dict(line.split(": ", 1) for line in cat(stats).splitlines())

    assert list(fields()) == ["entries", "overrun", "commit overrun", "bytes", "oldest event ts",
                              "now ts", "dropped events", "read events"]
    assert fields()["entries"] == "0"
    assert echo(t / "events/kvmmmu/kvm_mmu_zap_all_fast/enable", "1").returncode == 0
    zap(d)
    wait_for(lambda: fields()["entries"] == "1", 10, "one entry")
    before = fields()
    assert int(before["bytes"]) > 0 and re.fullmatch(r" *\d+\.\d{6}", before["oldest event ts"])
    fd = os.open(t / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.read(fd, 4096)
    finally:
        os.close(fd)
    after = fields()
    assert (after["entries"], after["bytes"]) == ("0", "0")
    assert int(after["read events"]) == int(before["read events"]) + 1
