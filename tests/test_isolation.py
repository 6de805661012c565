"""Address-space isolation on a real VM: the fault log's rules, mapping, determinism, the switch bug."""

from __future__ import annotations

import errno
import importlib
import re
import sys

import pytest

import mmud
from mmud.kvm.isolation import arm_switch_fault, isolation_map
from mmud.kvm.isolation.faultlog import KVM_LAST_FAULT_COUNT
from mmud.kvm.module import kernel_text
from mmud.uapi.isolation import parse_map

ENTRY = re.compile(
    r"\[ *\d+\.\d{6}\] KVM isolation: page fault #(\d+) \((0|2)\) at (\S+\+0x[0-9a-f]+/0x[0-9a-f]+)"
    r" \[kvm\] on ([0-9a-f]{16}) \((\w+\+0x[0-9a-f]+/0x[0-9a-f]+)\)$")
FRAME = re.compile(r"\[ *\d+\.\d{6}\]  \S+\+0x[0-9a-f]+/0x[0-9a-f]+ \[\w+\]$")


def run(steps: int = 3000, seed: int = 1, **load: str) -> tuple[mmud.VM, list[str]]:
    vm = mmud.VM(seed=seed, workload="kernel", params=mmud.Params(load))
    vm.step(steps)
    return vm, list(vm.module.isolation.log.lines)


def entries(lines: list[str]) -> list[re.Match]:
    return [m for line in lines if (m := ENTRY.match(line))]


def test_faults_are_logged_once_per_ip_with_a_call_trace():
    vm, lines = run()
    found = entries(lines)
    assert found, lines
    assert [int(m[1]) for m in found] == list(range(len(found)))
    ips = [m[3] for m in found]
    assert len(ips) == len(set(ips))
    assert lines.count(lines[1]) >= 1 and lines[1].endswith("Call Trace:")
    for line in lines:
        assert ENTRY.match(line) or line.endswith("Call Trace:") or FRAME.match(line), line
    stat = vm.stats
    assert stat["isolation_faults"] > len(found)  # the same IPs fault again, unlogged
    assert stat["isolation_enters"] == stat["isolation_exits"]  # KVM_RUN returned


def test_page_fault_stack_off_drops_the_trace():
    _, lines = run(page_fault_stack="N")
    assert entries(lines) and len(entries(lines)) == len(lines)


def test_same_seed_same_log():
    assert run(seed=7)[1] == run(seed=7)[1]


def test_isolation_off_costs_nothing_and_logs_nothing():
    vm, lines = run(address_space_isolation="N")
    assert lines == [] and vm.isolation is None and vm.mmu.obs is None
    assert vm.stats["isolation_enters"] == vm.stats["isolation_faults"] == 0


def test_mapping_a_symbol_stops_its_faults():
    vm, lines = run()
    symbols = {m[5].split("+")[0] for m in entries(lines)}
    assert "mmu_page_hash" in symbols
    for name in symbols:
        isolation_map(vm.module.isolation, parse_map(name.encode() + b"\n"))
    vm2 = mmud.VM(seed=1, workload="kernel", module=vm.module)  # a new VM clears the log
    assert not vm.module.isolation.log.lines
    vm2.step(3000)
    later = {m[5].split("+")[0] for m in entries(list(vm.module.isolation.log.lines))}
    assert not later & symbols
    mapped = vm.module.isolation.mm.lines()
    assert any(line.endswith(" mmu_page_hash") for line in mapped)


@pytest.mark.parametrize("text", [b"", b"\n", b"no such symbol", b"1 2 3", b"ffff888100000000 0",
                                  b"1000 10", b"zz 10", b"kvm\n\n", b"-kvm"])
def test_map_refuses_bad_input(text):
    with pytest.raises(OSError) as e:
        parse_map(text)
    assert e.value.errno == errno.EINVAL


def test_map_refuses_unknown_symbol_and_maps_ranges():
    vm = mmud.VM(params=mmud.Params())
    with pytest.raises(OSError) as e:
        isolation_map(vm.module.isolation, parse_map(b"nosuchsym"))
    assert e.value.errno == errno.EINVAL
    isolation_map(vm.module.isolation, parse_map(b"0xffff888103300010 8\n"))
    mm = vm.module.isolation.mm
    assert mm.is_mapped(0xFFFF888103300FF8) and not mm.is_mapped(0xFFFF888103301000)


def test_switch_fault_dumps_both_page_tables():
    vm, _ = run(steps=200)
    arm_switch_fault(vm)
    vm.step(200)
    lines = [line.split("] ", 1)[1] for line in vm.module.isolation.log.lines]
    k = next(i for i, line in enumerate(lines) if line.endswith("while switching mm"))
    kvm_dump, kernel_dump = lines[k - 2], lines[k - 1]
    assert re.fullmatch(r"BASE [0-9a-f]{16} PGD \w+ P4D \w+ PUD \w+ PMD 0", kvm_dump)
    assert re.fullmatch(r"BASE [0-9a-f]{16} PGD \w+ P4D \w+ PUD \w+ PMD \w+ PTE \w+", kernel_dump)
    assert "at kvm_isolation_exit+0x" in lines[k] and "(init_mm+0x50/0x3c0)" in lines[k]
    assert lines[k + 1].startswith("  cr3=") and lines[k + 4] == "Call Trace:"


PROBES = KVM_LAST_FAULT_COUNT + 2


def test_the_129th_ip_fills_the_table(tmp_path, monkeypatch):
    """130 real touch points in a loaded module, each its own IP: 128 logged, then one full."""
    source = "".join(f"def probe_{i}(mmu, gfn):\n    if mmu.obs: mmu.obs.hash_lookup(gfn)  # observer\n\n"
                     for i in range(PROBES))
    (tmp_path / "asi_probe.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = importlib.import_module("asi_probe")
    try:
        kernel_text().insmod("asi_probe", "asi_probe")
        vm = mmud.VM(params=mmud.Params())
        for i in range(PROBES):
            vm.isolation.enter()
            getattr(probe, f"probe_{i}")(vm.mmu, 5)
            assert vm.mmu.obs is None  # the fault switched back (isolation detached)
    finally:
        sys.modules.pop("asi_probe", None)
    log = vm.module.isolation.log
    lines = [line.split("] ", 1)[1] for line in log.lines if "Call Trace" not in line]
    assert lines[KVM_LAST_FAULT_COUNT] == "KVM isolation: fault tracking buffer is full [128]"
    assert lines[KVM_LAST_FAULT_COUNT + 1].startswith("KVM isolation: page fault #128 (0) at probe_128+")
    assert len(lines) == KVM_LAST_FAULT_COUNT + 2 and log.dropped == 1
    assert vm.stats["isolation_faults"] == PROBES
