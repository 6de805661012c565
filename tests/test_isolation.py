"""Address-space isolation on a real VM: the fault log's rules, mapping, determinism, the switch bug."""

from __future__ import annotations

import errno
import importlib
import json
import re
import sys

import pytest

import mmud
from mmud.daemon.faultlog import FaultLogPublisher
from mmud.guest.hw import GuestVcpu
from mmud.kvm.isolation import arm_switch_fault, isolation_map
from mmud.kvm.isolation import layout as L
from mmud.kvm.isolation.symbols import HARDWARE, KERNEL_NAMES
from mmud.kvm.isolation.faultlog import KVM_LAST_FAULT_COUNT
from mmud.kvm.mmu.mmu import KvmMmu
from mmud.kvm.mmu.page import hash_64
from mmud.kvm.module import KvmModule, kernel_text
from mmud.uapi.isolation import parse_map

ENTRY = re.compile(
    r"\[ *\d+\.\d{6}\] KVM isolation: page fault #(\d+) \((0|2)\) at (\S+\+0x[0-9a-f]+/0x[0-9a-f]+)"
    r" \[kvm\] on ([0-9a-f]{16}) \((0x[0-9a-f]+|\S+\+0x[0-9a-f]+/0x[0-9a-f]+(?: \[\w+\])?)\)$")
FRAME = re.compile(r"\[ *\d+\.\d{6}\]  \S+\+0x[0-9a-f]+/0x[0-9a-f]+ \[\w+\]$")
ON = {"address_space_isolation": "1"}  # explicit: the default may change


def NOBODY(vm: object) -> dict[str, object]:  # noqa: N802 - a constant-like describe callable
    """A publisher's `describe` that knows no VM."""
    return {}


def run(steps: int = 3000, seed: int = 1, **load: str) -> tuple[mmud.VM, list[str]]:
    vm = mmud.VM(seed=seed, workload="kernel", params=mmud.Params(ON | load))
    vm.step(steps)
    return vm, list(vm.module.isolation.log.lines)


def table(vm: mmud.VM) -> list[dict[str, str]]:
    """kvm/isolation/faults as rows of named columns (the header names them)."""
    header, *rows = vm.module.isolation.log.table_lines()
    names = header.split()
    assert names == ["entry", "ip", "address", "object", "count"]
    return [dict(zip(names, row.split(), strict=True)) for row in rows]


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
    symbols = {row["object"].split("+")[0] for row in table(vm)}
    assert "mmu_page_hash" in symbols
    for name in symbols:
        isolation_map(vm.module.isolation, parse_map(name.encode() + b"\n"))
    vm2 = mmud.VM(seed=1, workload="kernel", module=vm.module)  # a new VM clears the log
    assert not vm.module.isolation.log.lines and table(vm2) == []
    vm2.step(3000)
    later = {row["object"].split("+")[0] for row in table(vm2)}
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
    vm = mmud.VM(params=mmud.Params(ON))
    with pytest.raises(OSError) as e:
        isolation_map(vm.module.isolation, parse_map(b"nosuchsym"))
    assert e.value.errno == errno.EINVAL
    isolation_map(vm.module.isolation, parse_map(b"0xffff888103300010 8\n"))
    mm = vm.module.isolation.mm
    assert mm.is_mapped(0xFFFF888103300FF8) and not mm.is_mapped(0xFFFF888103301000)


def test_mapping_what_is_mapped_already_is_a_no_op():
    vm = mmud.VM(params=mmud.Params(ON))
    mm = vm.module.isolation.mm
    initial = mm.lines()
    for _ in range(5000):
        isolation_map(vm.module.isolation, parse_map(b"mmu_page_hash\n"))
    assert mm.lines()[:len(initial)] == initial
    assert len(mm.lines()) == len(initial) + 1 and mm.lines()[-1].endswith(" mmu_page_hash")
    for text in (b"kvm\n", b"_stext\n", b"0xffffffff81000010 8\n"):  # inside initial mappings
        isolation_map(vm.module.isolation, parse_map(text))
    assert len(mm.lines()) == len(initial) + 1
    isolation_map(vm.module.isolation, parse_map(b"0xffff888106000010 8\n"))
    isolation_map(vm.module.isolation, parse_map(b"0xffff888106000ff0 10\n"))  # same page
    assert len(mm.lines()) == len(initial) + 2
    isolation_map(vm.module.isolation, parse_map(b"0xffff888106000ff0 20\n"))  # one page more
    assert len(mm.lines()) == len(initial) + 3
    assert mm.is_mapped(0xFFFF888106001008) and not mm.is_mapped(0xFFFF888106002000)


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
        vm = mmud.VM(params=mmud.Params(ON))
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
    rows = table(vm)  # the logged ones: the 128 tracked and the one after the warning
    assert [int(r["entry"]) for r in rows] == list(range(KVM_LAST_FAULT_COUNT + 1))
    assert rows[-1]["ip"].startswith("probe_128+0x") and rows[-1]["count"] == "1"
    assert {r["object"] for r in rows} == {f"mmu_page_hash+{hash_64(5) * 8:#x}"}


# -- %pS of the faulting address, and kvm/isolation/faults ------------------------------------


def test_allocated_objects_print_as_the_bare_address():
    """Heap, vmalloc and direct-map objects are unknown to kallsyms: `(%pS)` is `0x` + %px."""
    vm, lines = run()
    found = entries(lines)
    assert found
    for m in found:
        assert m[5] == "0x" + m[4].lstrip("0"), m[0]
    objects = {row["object"].split("+")[0] for row in table(vm)}
    # struct kvm (its mmu_page_hash), a vmalloc array, direct-map shadow page tables
    assert {"mmu_page_hash", "slot0_gfn_track", "mmu_shadow_page"} <= objects


def test_percent_ps_names_image_and_module_symbols_only():
    vm, _ = run(steps=300)  # shadow pages exist
    symbols = vm.isolation.symbols()
    ps = symbols.sprint_symbol
    # kernel image: text, and data with CONFIG_KALLSYMS_ALL
    assert ps(L.INIT_MM + 0x50) == "init_mm+0x50/0x3c0"
    assert ps(L.INIT_MM) == "init_mm+0x0/0x3c0"
    assert ps(L.KERNEL_TEXT + 0x1234) == "_stext+0x1234/0xe00000"
    # a function of the kvm module's text
    sym = kernel_text().symbol(KvmMmu.alloc_page.__code__)
    assert sym is not None and sym.name == "kvm_mmu_alloc_page"
    assert ps(sym.address + 6) == f"kvm_mmu_alloc_page+0x6/{sym.size:#x} [kvm]"
    # everything allocated: kmalloc/slab, vmalloc, per-CPU, cpu_entry_area, direct map
    for name, offset in [("kvm", 0x10), ("mmu_page_hash", 0x30E0), ("vcpu0", 0x2A0),
                         ("vcpu0_task", 8), ("vcpu0_stack", 0x3F00), ("cpu0_per_cpu", 0x100),
                         ("cpu_entry_area", 0x1000), ("slot0_rmap", 0x40),
                         ("slot0_gfn_track", 0xE), ("mmu_page_header", 0x730),
                         ("mmu_shadow_page", 0x3008), ("kvm_memslots", 0x208)]:
        region = symbols.lookup(name)
        assert region is not None and region.kind == L.ALLOC, name
        address = region.start + offset
        assert ps(address) == f"0x{address:x}", name
        assert symbols.describe(address) == f"{name}+{offset:#x}"
    assert [symbols.lookup(n).kind for n in ("_stext", "init_mm", "kvm_text")] == \
        [L.IMAGE, L.IMAGE, L.MODULE]
    assert ps(0xFFFFFFFF00000000) == "0xffffffff00000000"  # no region at all


def test_faults_table_lists_each_logged_fault_with_its_object():
    vm, lines = run()
    found, rows = entries(lines), table(vm)
    assert len(rows) == len(found)
    symbols = vm.isolation.symbols()
    for m, row in zip(found, rows, strict=True):
        assert row["entry"] == m[1] and row["ip"] == m[3] and row["address"] == m[4]
        assert row["object"] == symbols.describe(int(m[4], 16))
        assert int(row["count"]) >= 1
    by_function = {row["ip"].split("+")[0]: row["object"] for row in rows}
    assert by_function["kvm_mmu_get_page"].startswith("mmu_page_hash+0x")  # its hash bucket
    assert by_function["set_spte"].startswith("mmu_shadow_page+0x")  # sp->spt[i]
    # every isolation fault of this VM is a fault of a logged IP (no table overflow here)
    assert sum(int(row["count"]) for row in rows) == vm.stats["isolation_faults"]


def test_faults_table_count_grows_as_an_ip_faults_again():
    vm, _ = run(steps=1000)
    log = vm.module.isolation.log
    before = {row["ip"]: int(row["count"]) for row in table(vm)}
    version, table_version = log.version, log.table_version
    vm.step(1000)
    after = {row["ip"]: int(row["count"]) for row in table(vm)}
    grown = [ip for ip in before if after[ip] > before[ip]]
    assert grown and all(after[ip] >= before[ip] for ip in before)
    assert log.table_version > table_version
    assert sum(after.values()) == vm.stats["isolation_faults"]
    if after.keys() == before.keys():  # no new entry: the log itself did not change
        assert log.version == version


def test_the_publisher_republishes_the_table_only_when_it_changed():
    vm, _ = run(steps=500)
    publisher = FaultLogPublisher(vm.module.isolation, None)
    first = publisher.logs(NOBODY)
    assert first["isolation/faults"] == vm.module.isolation.log.table_lines()
    assert first["isolation/faults"][0].split() == ["entry", "ip", "address", "object", "count"]
    again = publisher.logs(NOBODY)
    assert again["isolation/faults"] is first["isolation/faults"]  # unchanged: not rebuilt
    assert again["fault_log"] is first["fault_log"]
    vm.step(500)
    later = publisher.logs(NOBODY)
    assert later["isolation/faults"] != first["isolation/faults"]
    assert later["isolation/faults"] == vm.module.isolation.log.table_lines()


# -- whose fault: each entry is credited to the VM that took it --------------------------------


def two_vms() -> tuple[mmud.VM, mmud.VM, dict[object, dict[str, object]]]:
    """vm0 and vm1 on one kvm module (one fault log), and what a daemon says of each."""
    module = KvmModule(ON)
    vm0 = mmud.VM(seed=1, workload="kernel", module=module)
    vm1 = mmud.VM(seed=2, workload="kernel", module=module)
    return vm0, vm1, {vm0: {"vm": "vm0", "seed": 1}, vm1: {"vm": "vm1", "seed": 2}}


def test_a_pending_entry_remembers_the_vm_that_took_the_fault():
    vm0, vm1, _ = two_vms()
    log = vm0.module.isolation.log
    vm1.step(200)
    vm0.step(3000)  # the IPs vm1 has not reached yet fault in vm0
    pending = log.take_pending()
    owners = [e.vm for e in pending]
    assert vm1 in owners and vm0 in owners
    assert owners == sorted(owners, key=lambda vm: vm is vm0)  # vm1's first, then vm0's
    for e in pending:
        assert e.row is not None and f"page fault #{e.row.entry} " in e.lines[0]


def test_the_publisher_credits_each_record_to_its_vm(tmp_path):
    """Not to the newest VM: vm0's faults say vm0 (and its step), vm1's say vm1."""
    vm0, vm1, names = two_vms()
    publisher = FaultLogPublisher(vm0.module.isolation, str(tmp_path))

    def describe(vm):
        return {**names[vm], "step": vm.steps}

    vm1.step(200)
    publisher.logs(describe)
    vm0.step(3000)
    logs = publisher.logs(describe)
    records = [json.loads(line) for line in (tmp_path / "fault_log.jsonl").read_text().splitlines()]
    by_vm = {r["vm"]: [] for r in records}
    for r in records:
        by_vm[r["vm"]].append(r)
    assert set(by_vm) == {"vm0", "vm1"}
    assert {(r["seed"], r["step"]) for r in by_vm["vm1"]} == {(2, 200)}
    assert {(r["seed"], r["step"]) for r in by_vm["vm0"]} == {(1, 3000)}
    # kvm/isolation/history: the same records as rows with their run and VM
    header, *rows = logs["isolation/history"]
    assert header.split() == ["run", "vm", "entry", "ip", "address", "object", "count"]
    assert [row.split()[:3] for row in rows] == [["1", r["vm"], str(r["entry"])] for r in records]


def test_a_vm_gone_before_its_entries_are_published_keeps_its_name():
    vm0, vm1, names = two_vms()
    publisher = FaultLogPublisher(vm0.module.isolation, None)
    known = dict(names)

    def describe(vm):
        return {**known[vm], "step": vm.steps} if vm in known else {"step": vm.steps}

    vm0.step(200)
    publisher.logs(describe)
    vm0.step(3000)
    del known[vm0]  # restarted: the simulation no longer knows it by name
    publisher.logs(describe)
    rows = [row.split() for row in publisher.logs(describe)["isolation/history"][1:]]
    assert len(rows) > 3 and {row[1] for row in rows} == {"vm0"}


def test_the_guests_instructions_are_the_processors_not_kvm_text():
    """What the guest does through its vCPU — loads, stores, scans, string instructions —
    models the processor: a call trace ends below it, it is never a frame of kvm. Only an
    instruction that exits (INVLPG) has a KVM handler of its own."""
    methods = {name for name, value in vars(GuestVcpu).items()
               if callable(value) and not name.startswith("_") and name != "index"}
    for name in methods:
        key = f"mmud.kvm.vcpu:Vcpu.{name}"
        assert (key in HARDWARE) != (key in KERNEL_NAMES), key
    assert {"read_u64", "scan_u64", "clear_page", "invlpg"} <= methods
