"""The control tree and its nodes in-process, against a fake simulation (tests/fakebackend.py).

Layout, modes, rendering, and the store path: a write is parsed here and either refused with
the kernel's errno before anything reaches the simulation, or turned into exactly one request.
What only a mount shows (the kernel's handling of open/write/truncate, shells) stays in the
other tests/test_fs_*.py files.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import Any

import pytest

from mmud.daemon.protocol import Snapshot, VmConfig
from mmud.fs.nodes import BinaryFile, Dir, File, Node, PipeFile, RequestFile
from mmud.fs.tree import Tree
from mmud.uapi.bugs import INJECTABLE_BUGS, render_choices
from mmud.uapi.params import Params
from mmud.uapi.stats import STATS, Kind
from mmud.uapi.vms import mem_size
from tests.fakebackend import FakeBackend, snapshot, vm_snapshot

VM0_DIR, VM1_DIR = "4242-7", "4242-9"
# The instant stats (STATS_DESC_ICOUNTER in v5.16's x86.c): 0444, no setter.
GAUGES = {"mmu_unsync", "pages_4k", "pages_2m", "pages_1g", "nx_lpage_splits", "guest_mode"}
VM_FILES = {"memory", "dirty_log", "migrate", "state", "break", "inject", "status", "recording",
            "memslots", "zap_all", "mmu"}


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(snapshot(vm_snapshot("vm0", VM0_DIR, dirty_log_slots=(0, 3)),
                                vm_snapshot("vm1", VM1_DIR)))


@pytest.fixture
def tree(backend: FakeBackend) -> Tree:
    return Tree(backend, Params())


def lookup(tree: Tree, path: str, snap: Snapshot | None = None) -> Node:
    return tree.lookup(path, snap or current(tree))


def fake(tree: Tree) -> FakeBackend:
    assert isinstance(tree.backend, FakeBackend)
    return tree.backend


def current(tree: Tree) -> Snapshot:
    snap = fake(tree).snapshot
    assert snap is not None
    return snap


def children(tree: Tree, path: str, snap: Snapshot | None = None) -> list[str]:
    node = lookup(tree, path, snap)
    assert isinstance(node, Dir), path
    return list(node.children(snap or current(tree)))


def read(tree: Tree, path: str, snap: Snapshot | None = None) -> bytes:
    node = lookup(tree, path, snap)
    assert isinstance(node, File), path
    return node.render(snap or current(tree))


def store(tree: Tree, path: str, data: bytes) -> None:
    node = lookup(tree, path)
    assert isinstance(node, File), path
    node.store(data)


def refused(tree: Tree, path: str, data: bytes) -> int | None:
    """The errno a store of `data` fails with; the store must not have reached the backend."""
    with pytest.raises(OSError) as e:
        store(tree, path, data)
    assert fake(tree).requests == [], "a refused write reached the simulation"
    return e.value.errno


# -- layout ------------------------------------------------------------------------------


def test_root_holds_parameters_kvm_and_one_directory_per_vm(tree):
    assert children(tree, "/") == ["parameters", "kvm", "vms", "tracing", "vm0", "vm1"]


def test_parameters_lists_every_module_parameter_in_kernel_order(tree):
    assert children(tree, "/parameters") == [
        "mmu_audit", "mmu_audit_ratelimit_ms", "mmu_audit_ratelimit_burst", "mmu_audit_scope",
        "page_fault_stack", "address_space_isolation", "mmio_caching"]


def test_kvm_holds_mmu_debug_every_stat_the_logs_and_one_directory_per_vm(tree):
    names = children(tree, "/kvm")
    assert set(names) == {"mmu-debug", "fault_log", "isolation", "audit_log", VM0_DIR, VM1_DIR,
                          *(s.name for s in STATS)}
    assert len(names) == len(set(names))


@pytest.mark.parametrize("vm_dir", [VM0_DIR, VM1_DIR])
def test_per_vm_debugfs_directory_holds_every_stat_in_kernel_order(tree, vm_dir):
    # kvm_create_vm_debugfs() makes the stats, then kvm_arch_create_vm_debugfs() mmu_rmaps_stat
    assert children(tree, f"/kvm/{vm_dir}") == [*(s.name for s in STATS), "mmu_rmaps_stat"]


@pytest.mark.parametrize("vm", ["vm0", "vm1"])
def test_vm_directory_holds_the_simulator_controls(tree, vm):
    assert set(children(tree, f"/{vm}")) == VM_FILES


def test_isolation_directory_holds_map_mappings_faults_and_history(tree):
    assert children(tree, "/kvm/isolation") == ["map", "mappings", "faults", "history"]


def test_isolation_history_renders_the_published_rows():
    rows = ("  run vm     entry ip ... count", "    1 vm0        0 f+0x1/0x2 ...  3")
    tree = Tree(FakeBackend(snapshot(vm_snapshot("vm0", VM0_DIR),
                                     logs={"isolation/history": rows})), Params())
    assert read(tree, "/kvm/isolation/history") == "".join(f"{r}\n" for r in rows).encode()
    assert read(tree, "/kvm/isolation/history", snapshot()) == b""  # nothing published yet


def test_dirty_log_directory_lists_the_slots_with_logging_on(tree):
    assert children(tree, "/vm0/dirty_log") == ["0", "3"]
    assert children(tree, "/vm1/dirty_log") == []


def test_vm_directories_appear_and_disappear_with_the_snapshot(tree):
    only_vm0 = snapshot(vm_snapshot("vm0", VM0_DIR))
    only_vm1 = snapshot(vm_snapshot("vm1", VM1_DIR))
    assert children(tree, "/", only_vm0) == ["parameters", "kvm", "vms", "tracing", "vm0"]
    assert VM1_DIR not in children(tree, "/kvm", only_vm0)
    for path in ("/vm1/state", f"/kvm/{VM1_DIR}/exits"):
        with pytest.raises(FileNotFoundError):
            lookup(tree, path, only_vm0)
    assert children(tree, "/", only_vm1) == ["parameters", "kvm", "vms", "tracing", "vm1"]
    assert lookup(tree, f"/kvm/{VM1_DIR}/exits", only_vm1)
    with pytest.raises(FileNotFoundError):
        lookup(tree, f"/kvm/{VM0_DIR}", only_vm1)


def test_a_restarted_vm_keeps_its_name_under_a_new_debugfs_directory(tree):
    restarted = snapshot(vm_snapshot("vm0", "4242-11"))
    assert children(tree, "/kvm", restarted)[-1] == "4242-11"
    assert VM0_DIR not in children(tree, "/kvm", restarted)
    assert lookup(tree, "/vm0/state", restarted)


def test_dirty_log_slots_follow_the_snapshot(tree):
    later = snapshot(vm_snapshot("vm0", VM0_DIR, dirty_log_slots=(5,)))
    assert children(tree, "/vm0/dirty_log", later) == ["5"]
    with pytest.raises(FileNotFoundError):
        lookup(tree, "/vm0/dirty_log/0", later)


@pytest.mark.parametrize("path", [
    "/nope", "/parameters/nope", "/kvm/nope", "/kvm/1-2/exits", "/vm2", "/vm2/state", "/vm0/nope",
    "/kvm/mmu_pte_updated", f"/kvm/{VM0_DIR}/mmu_pte_updated", "/kvm/largepages", "/kvm/blocking",
    "/vm0/dirty_log/1", "/kvm/isolation/nope", "/parameters/mmu_audit/x", "/vm0/status/x",
])
def test_missing_paths_are_enoent(tree, path):
    with pytest.raises(OSError) as e:
        lookup(tree, path)
    assert e.value.errno == errno.ENOENT


def test_root_path_is_the_root_directory(tree):
    assert lookup(tree, "/") is tree.root


# -- modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "mode"), [
    ("mmu_audit", 0o644), ("mmu_audit_ratelimit_ms", 0o644), ("mmu_audit_ratelimit_burst", 0o644),
    ("mmu_audit_scope", 0o644), ("page_fault_stack", 0o444), ("address_space_isolation", 0o444),
    ("mmio_caching", 0o444),
])
def test_parameter_files_have_the_module_parameter_mode(tree, name, mode):
    node = lookup(tree, f"/parameters/{name}")
    assert isinstance(node, File)
    assert (node.mode, node.writable) == (mode, mode == 0o644)


@pytest.mark.parametrize("desc", STATS, ids=lambda d: d.name)
@pytest.mark.parametrize("where", ["kvm", f"kvm/{VM0_DIR}"])
def test_instant_stats_are_0444_and_the_others_0644(tree, desc, where):
    node = lookup(tree, f"/{where}/{desc.name}")
    assert isinstance(node, File)
    gauge = desc.name in GAUGES
    assert (node.mode, node.writable) == ((0o444, False) if gauge else (0o644, True))
    assert gauge == (desc.kind is Kind.INSTANT)


@pytest.mark.parametrize(("path", "mode"), [
    ("/kvm/mmu-debug", 0o644), ("/kvm/fault_log", 0o444), ("/kvm/audit_log", 0o444),
    ("/kvm/isolation/map", 0o200), ("/kvm/isolation/mappings", 0o444), ("/vm0/memory", 0o600),
    ("/kvm/isolation/faults", 0o444), ("/kvm/isolation/history", 0o444),
    ("/vm0/dirty_log/3", 0o400), ("/vm0/migrate", 0o644), ("/vm0/state", 0o644),
    ("/vm0/inject", 0o644), ("/vm0/status", 0o444), ("/vm0/memslots", 0o644),
    ("/vm0/zap_all", 0o644), ("/vms", 0o644),
])
def test_control_files_have_their_documented_mode(tree, path, mode):
    node = lookup(tree, path)
    assert not isinstance(node, Dir)
    assert (node.mode, node.writable) == (mode, bool(mode & 0o200))


@pytest.mark.parametrize("path", ["/", "/parameters", "/kvm", f"/kvm/{VM0_DIR}", "/kvm/isolation",
                                  "/vm0", "/vm0/dirty_log"])
def test_directories_are_0755(tree, path):
    node = lookup(tree, path)
    assert isinstance(node, Dir) and node.mode == 0o755


def test_byte_files_are_not_rendered_from_the_snapshot(tree):
    for path in ("/vm0/memory", "/vm0/dirty_log/0"):
        node = lookup(tree, path)
        assert isinstance(node, BinaryFile)
        assert node.render(current(tree)) == b""
    assert fake(tree).requests == []


# -- rendering -----------------------------------------------------------------------------


@pytest.mark.parametrize(("load", "name", "content"), [
    ({}, "mmu_audit", b"N\n"), ({"mmu_audit": "1"}, "mmu_audit", b"Y\n"),
    ({}, "page_fault_stack", b"Y\n"), ({"page_fault_stack": "n"}, "page_fault_stack", b"N\n"),
    ({"mmu_audit_ratelimit_ms": "0x10"}, "mmu_audit_ratelimit_ms", b"16\n"),
    ({}, "mmu_audit_ratelimit_burst", b"10\n"),
    ({"mmu_audit_scope": "incremental"}, "mmu_audit_scope", b"incremental\n"),
])
def test_parameter_files_show_the_kernel_rendering(tree, load, name, content):
    assert read(tree, f"/parameters/{name}", snapshot(params=Params(load))) == content


@pytest.mark.parametrize(("audit", "content"), [("0", b"0\n"), ("1", b"1\n")])
def test_mmu_debug_reads_1_or_0_as_mmu_audit_is_on_or_off(tree, audit, content):
    assert read(tree, "/kvm/mmu-debug", snapshot(params=Params({"mmu_audit": audit}))) == content


def test_top_level_stat_is_the_sum_over_vms_and_the_per_vm_one_is_that_vm(tree):
    snap = snapshot(vm_snapshot("vm0", VM0_DIR, stats={"exits": 5, "pages_4k": 2}),
                    vm_snapshot("vm1", VM1_DIR, stats={"exits": 7}))
    assert read(tree, "/kvm/exits", snap) == b"12\n"
    assert read(tree, f"/kvm/{VM0_DIR}/exits", snap) == b"5\n"
    assert read(tree, f"/kvm/{VM1_DIR}/exits", snap) == b"7\n"
    assert read(tree, "/kvm/pages_4k", snap) == b"2\n"


def test_stats_render_as_unsigned_64_bit_decimal(tree):
    snap = snapshot(vm_snapshot("vm0", VM0_DIR, stats={"pf_fixed": 2**64 - 1}))
    assert read(tree, "/kvm/pf_fixed", snap) == b"18446744073709551615\n"
    assert read(tree, "/kvm/pf_guest", snap) == b"0\n"


def test_top_level_stats_read_0_without_vms(tree):
    assert read(tree, "/kvm/exits", snapshot()) == b"0\n"


@pytest.mark.parametrize(("name", "mode", "writable"), [
    ("pages_2m", 0o444, False), ("pages_1g", 0o444, False), ("nx_lpage_splits", 0o444, False),
    ("guest_mode", 0o444, False), ("max_mmu_rmap_size", 0o644, True),
    ("remote_tlb_flush_requests", 0o644, True), ("halt_poll_success_ns", 0o644, True),
    # kvm_stats_debugfs_mode(): a histogram is neither instant nor cumulative nor peak -> 0644
    ("halt_poll_success_hist", 0o644, True), ("halt_wait_hist", 0o644, True),
    ("pf_taken", 0o644, True), ("pf_spurious", 0o644, True), ("req_event", 0o644, True),
])
@pytest.mark.parametrize("where", ["kvm", f"kvm/{VM0_DIR}"])
def test_v5_16_stats_have_the_kernel_debugfs_mode(tree, name, mode, writable, where):
    node = lookup(tree, f"/{where}/{name}")
    assert isinstance(node, File)
    assert (node.mode, node.writable) == (mode, writable)
    assert read(tree, f"/{where}/{name}") == b"0\n"


def test_new_peak_and_requests_stats_clear_on_zero(tree):
    store(tree, "/kvm/max_mmu_rmap_size", b"0\n")
    store(tree, f"/kvm/{VM1_DIR}/remote_tlb_flush_requests", b"0")
    store(tree, "/kvm/halt_wait_hist", b"0")
    assert fake(tree).requests == [
        ("clear_stat", {"name": "max_mmu_rmap_size", "vm": None}),
        ("clear_stat", {"name": "remote_tlb_flush_requests", "vm": "vm1"}),
        ("clear_stat", {"name": "halt_wait_hist", "vm": None})]


def test_a_new_gauge_refuses_a_clear_with_eacces(tree):
    for path in ("/kvm/pages_2m", f"/kvm/{VM0_DIR}/pages_1g", "/kvm/guest_mode"):
        assert refused(tree, path, b"0\n") == errno.EACCES


def test_inject_shows_the_injectable_bugs_with_the_armed_one_in_brackets(tree):
    snap = snapshot(vm_snapshot("vm0", VM0_DIR, inject=render_choices("wrong_pfn", INJECTABLE_BUGS)))
    text = read(tree, "/vm0/inject", snap)
    assert text.startswith(b"none rmap_add_skipped ") and text.endswith(b"isolation_switch_fault\n")
    assert b" [wrong_pfn] " in text and text.count(b"[") == 1


@pytest.mark.parametrize("state", ["running", "paused", "crashed"])
def test_state_reads_the_vm_state_as_one_line(tree, state):
    assert read(tree, "/vm1/state", snapshot(vm_snapshot("vm1", VM1_DIR, state=state))) == (
        state.encode() + b"\n")


@pytest.mark.parametrize(("field", "path"), [("status", "/vm0/status"), ("memslots", "/vm0/memslots"),
                                             ("migrate", "/vm0/migrate")])
def test_vm_text_files_show_the_simulations_text(tree, field, path):
    text = f"{field}: line one\nline two\n"
    assert read(tree, path, snapshot(vm_snapshot("vm0", VM0_DIR, **{field: text}))) == text.encode()


@pytest.mark.parametrize(("path", "log"), [("/kvm/fault_log", "fault_log"),
                                           ("/kvm/audit_log", "audit_log"),
                                           ("/kvm/isolation/mappings", "isolation/mappings")])
def test_log_files_show_one_line_per_entry(tree, path, log):
    assert read(tree, path, snapshot(logs={log: ("first", "second")})) == b"first\nsecond\n"
    assert read(tree, path, snapshot()) == b""


def test_zap_all_reads_the_words_it_takes(tree):
    assert read(tree, "/vm0/zap_all") == b"fast slow legacy\n"


@pytest.mark.parametrize("kind", ["fast", "slow", "legacy"])
def test_zap_all_sends_one_request_per_word(tree, kind):
    store(tree, "/vm1/zap_all", kind.encode() + b"\n")
    store(tree, "/vm0/zap_all", kind.encode())
    assert fake(tree).requests == [("zap_all", {"vm": "vm1", "kind": kind}),
                                   ("zap_all", {"vm": "vm0", "kind": kind})]


def test_isolation_map_reads_empty(tree):
    assert read(tree, "/kvm/isolation/map") == b""


def test_isolation_faults_is_a_0444_file_showing_the_published_table(tree):
    node = lookup(tree, "/kvm/isolation/faults")
    assert type(node) is File and (node.mode, node.writable) == (0o444, False)
    rows = ("entry ip address object count",
            "    0 kvm_mmu_get_page+0x40/0x424 ffff8881033030e0 mmu_page_hash+0x30e0 12")
    assert read(tree, "/kvm/isolation/faults", snapshot(logs={"isolation/faults": rows})) == \
        "".join(f"{row}\n" for row in rows).encode()
    assert read(tree, "/kvm/isolation/faults", snapshot()) == b""
    assert refused(tree, "/kvm/isolation/faults", b"x\n") == errno.EACCES


def test_files_of_a_vm_that_is_gone_read_empty(tree):
    gone = snapshot(vm_snapshot("vm1", VM1_DIR))
    for path in ("/vm0/state", "/vm0/status", "/vm0/inject", "/vm0/memslots", "/vm0/migrate"):
        node = lookup(tree, path)  # opened while vm0 existed
        assert isinstance(node, File) and node.render(gone) == b""
    node = lookup(tree, f"/kvm/{VM0_DIR}/exits")
    assert isinstance(node, File) and node.render(gone) == b"0\n"


# -- stores: parsed here, one request each --------------------------------------------------


@pytest.mark.parametrize(("path", "data", "request_"), [
    ("/parameters/mmu_audit", b"1\n", ("param", {"name": "mmu_audit", "text": b"1\n"})),
    ("/parameters/mmu_audit_ratelimit_ms", b"0x2a",
     ("param", {"name": "mmu_audit_ratelimit_ms", "text": b"0x2a"})),
    ("/parameters/mmu_audit_scope", b"incremental\n",
     ("param", {"name": "mmu_audit_scope", "text": b"incremental\n"})),
    ("/kvm/mmu-debug", b"1", ("param", {"name": "mmu_audit", "text": b"1"})),
    ("/kvm/exits", b"0\n", ("clear_stat", {"name": "exits", "vm": None})),
    (f"/kvm/{VM1_DIR}/pf_fixed", b"0x0", ("clear_stat", {"name": "pf_fixed", "vm": "vm1"})),
    ("/kvm/max_mmu_page_hash_collisions", b"00",
     ("clear_stat", {"name": "max_mmu_page_hash_collisions", "vm": None})),
    ("/vm0/state", b"pause\n", ("state", {"vm": "vm0", "action": "pause"})),
    ("/vm1/state", b"restart", ("state", {"vm": "vm1", "action": "restart"})),
    ("/vm1/state", b"destroy\n", ("state", {"vm": "vm1", "action": "destroy"})),
    ("/vm1/inject", b"wrong_pfn\n", ("inject", {"vm": "vm1", "name": "wrong_pfn"})),
    ("/vm0/inject", b"none", ("inject", {"vm": "vm0", "name": "none"})),
    ("/vm0/migrate", b"start\n", ("migrate", {"vm": "vm0", "action": "start"})),
    ("/vm0/zap_all", b"slow\n", ("zap_all", {"vm": "vm0", "kind": "slow"})),
    ("/kvm/isolation/map", b"mmu_page_hash\n", ("isolation_map", {"text": b"mmu_page_hash\n"})),
    ("/kvm/isolation/map", b"ffff888103300000 10", ("isolation_map", {"text": b"ffff888103300000 10"})),
])
def test_a_good_write_sends_exactly_one_request(tree, path, data, request_):
    store(tree, path, data)
    assert fake(tree).requests == [request_]


@pytest.mark.parametrize(("data", "args"), [
    (b"add 9 0x100000000 0x10000\n", {"action": "add", "slot": 9, "gpa": 0x100000000,
                                      "size": 0x10000, "log_dirty": None}),
    (b"add 010 0x100000000 65536 log_dirty", {"action": "add", "slot": 8, "gpa": 0x100000000,
                                              "size": 65536, "log_dirty": True}),
    (b"move 9 0x200000000", {"action": "move", "slot": 9, "gpa": 0x200000000, "size": None,
                             "log_dirty": None}),
    (b"flags 9 log_dirty=0\n", {"action": "flags", "slot": 9, "gpa": None, "size": None,
                                "log_dirty": False}),
    (b"flags 9 log_dirty=1", {"action": "flags", "slot": 9, "gpa": None, "size": None,
                              "log_dirty": True}),
    (b"delete 9\n", {"action": "delete", "slot": 9, "gpa": None, "size": None, "log_dirty": None}),
])
def test_a_memslot_line_becomes_one_memslot_request(tree, data, args):
    store(tree, "/vm1/memslots", data)
    assert fake(tree).requests == [("memslot", {"vm": "vm1", **args})]


@pytest.mark.parametrize(("path", "data", "err"), [
    *[("/parameters/mmu_audit", t, errno.EINVAL) for t in (
        b"y", b"Y", b"on", b"true", b"2", b"10", b"-1", b"-0", b"0x1", b" 1", b"1 ", b"1\n\n",
        b"1a", b"\n", b"99999999999999999999")],
    *[("/kvm/mmu-debug", t, errno.EINVAL) for t in (b"2", b"y", b"maybe")],
    *[("/parameters/mmu_audit_ratelimit_burst", t, errno.EINVAL) for t in (
        b"08", b"0x", b"4 2", b" 42", b"42 ", b"42\n\n", b"-1")],
    ("/parameters/mmu_audit_ratelimit_burst", b"4294967296", errno.ERANGE),
    ("/parameters/mmu_audit_ratelimit_ms", b"99999999999999999999", errno.ERANGE),
    *[("/parameters/mmu_audit_scope", t, errno.EINVAL) for t in (b"Full", b"full\n\n", b" full",
                                                                  b"partial")],
])
def test_a_refused_parameter_write_fails_with_the_setters_errno_and_sends_nothing(tree, path, data,
                                                                                  err):
    assert refused(tree, path, data) == err


@pytest.mark.parametrize(("data", "err"), [
    (b"5", errno.EINVAL), (b"1", errno.EINVAL), (b"-0", errno.EINVAL), (b"zero", errno.EINVAL),
    (b"0 0", errno.EINVAL), (b"0\n\n", errno.EINVAL), (b"\n", errno.EINVAL),
    (b"0x", errno.EINVAL), (b"99999999999999999999", errno.ERANGE),
])
@pytest.mark.parametrize("path", ["/kvm/exits", f"/kvm/{VM0_DIR}/pf_fixed"])
def test_a_stat_clears_only_on_zero_and_a_refusal_sends_nothing(tree, path, data, err):
    assert refused(tree, path, data) == err


def test_a_stat_write_parses_only_the_first_23_bytes_as_simple_attr_write(tree):
    store(tree, "/kvm/exits", b"0" * 23 + b"5")  # the 5 is past simple_attr_write's buffer
    assert fake(tree).requests == [("clear_stat", {"name": "exits", "vm": None})]
    fake(tree).requests.clear()
    assert refused(tree, "/kvm/exits", b"0" * 22 + b"5") == errno.EINVAL


def test_a_stat_write_ends_at_the_first_nul(tree):
    store(tree, "/kvm/exits", b"0\0junk")
    assert fake(tree).requests == [("clear_stat", {"name": "exits", "vm": None})]


@pytest.mark.parametrize(("path", "data"), [
    *[("/vm0/zap_all", w) for w in (b"\n", b"", b"Fast", b"fast\n\n", b" slow", b"fast slow",
                                    b"all", b"1", b"Legacy", b"legacy ", b"fast slow legacy")],
    *[("/vm0/state", w) for w in (b"stop", b"Run", b"run\n\n", b"run ", b"running")],
    *[("/vm0/inject", w) for w in (b"no_such_bug\n", b"", b"[none]", b"wrong_pfn wrong_pfn")],
    *[("/vm0/migrate", w) for w in (b"stop", b"start now", b"Start")],
])
def test_a_choice_file_refuses_other_words_with_einval_and_sends_nothing(tree, path, data):
    assert refused(tree, path, data) == errno.EINVAL


def test_inject_takes_every_injectable_bug(tree):
    for name in INJECTABLE_BUGS:
        store(tree, "/vm0/inject", name.encode() + b"\n")
    assert [args["name"] for _, args in fake(tree).requests] == list(INJECTABLE_BUGS)


@pytest.mark.parametrize("line", [
    b"\n", b"", b"add", b"add 9", b"add 9 0x100000000", b"add 9 0x100000000 0x1000 log_dirty=1",
    b"add 9 0x100000000 0x1000 log_dirty extra", b"add 9  0x100000000 0x1000", b"add x 0 0x1000",
    b"add 9 0x 0x1000", b"add -1 0 0x1000", b"Add 9 0 0x1000", b"move 0", b"flags 0",
    b"flags 0 log_dirty", b"flags 0 log_dirty=2", b"delete", b"delete 0 0", b"delete 0\n\n",
    b"delete 0\ndelete 0\n", b" delete 0", b"zap 0",
])
def test_a_malformed_memslot_line_fails_with_einval_and_sends_nothing(tree, line):
    assert refused(tree, "/vm0/memslots", line) == errno.EINVAL


def test_a_memslot_number_past_64_bits_is_erange(tree):
    assert refused(tree, "/vm0/memslots", b"delete 99999999999999999999") == errno.ERANGE


@pytest.mark.parametrize("data", [b"1 2 3", b"ffff888100000000 0", b"kvm kvm", b"1000 10",
                                  b"", b"mmu_page_hash\n\n", b"ffffffffffffffff 2"])
def test_a_malformed_isolation_map_write_fails_with_einval_and_sends_nothing(tree, data):
    assert refused(tree, "/kvm/isolation/map", data) == errno.EINVAL


@pytest.mark.parametrize("path", ["/parameters/page_fault_stack", "/parameters/mmio_caching",
                                  "/kvm/pages_4k", f"/kvm/{VM0_DIR}/mmu_unsync", "/vm0/status",
                                  "/kvm/fault_log", "/kvm/audit_log", "/kvm/isolation/mappings"])
def test_a_read_only_file_refuses_a_store_with_eacces(tree, path):
    node = lookup(tree, path)
    assert type(node) is File  # no store method at all, as a kernel file without ->store
    assert refused(tree, path, b"0\n") == errno.EACCES


@pytest.mark.parametrize(("path", "data", "op", "err"), [
    ("/vm0/memslots", b"add 0 0x100000000 0x1000", "memslot", errno.EEXIST),
    ("/vm0/state", b"run", "state", errno.EINVAL),
    ("/kvm/isolation/map", b"no_such_symbol", "isolation_map", errno.EINVAL),
    ("/vm0/migrate", b"start", "migrate", errno.EBUSY),
    ("/vms", b"create vm0", "create", errno.EEXIST),
    ("/vms", b"destroy vm5", "destroy", errno.ENOENT),
    ("/vms", b"destroy vm0", "destroy", errno.EPERM),
    ("/vm0/state", b"destroy", "state", errno.EPERM),
])
def test_the_simulations_refusal_reaches_the_writer_with_its_errno(tree, path, data, op, err):
    fake(tree).errors[op] = err
    with pytest.raises(OSError) as e:
        store(tree, path, data)
    assert e.value.errno == err
    assert [op for op, _ in fake(tree).requests] == [op]


def test_writable_files_are_request_files_and_read_only_ones_are_not(tree):
    writable = {"/parameters/mmu_audit", "/kvm/mmu-debug", "/kvm/exits", "/kvm/isolation/map",
                "/vm0/state", "/vm0/inject", "/vm0/migrate", "/vm0/memslots", "/vm0/zap_all"}
    for path in writable:
        assert isinstance(lookup(tree, path), RequestFile), path
    for path in ("/kvm/pages_4k", "/vm0/status", "/parameters/mmio_caching"):
        assert not isinstance(lookup(tree, path), RequestFile), path


# -- byte files: one request per chunk --------------------------------------------------------


def ram(size: int, chunk: int) -> dict[str, Any]:
    """Backend results for guest RAM of `size` bytes that answers at most `chunk` per request."""
    mem = bytearray(range(256)) * (size // 256)

    def read_(vm: str, gpa: int, size: int) -> bytes:
        return bytes(mem[gpa:gpa + min(size, chunk)])

    def write_(vm: str, gpa: int, data: bytes) -> int:
        n = min(len(data), chunk, len(mem) - gpa)
        mem[gpa:gpa + n] = data[:n]
        return n

    return {"memory_read": read_, "memory_write": write_}


def memory_handle(tree: Tree, vm: str = "vm0"):
    node = lookup(tree, f"/{vm}/memory")
    assert isinstance(node, BinaryFile)
    return node.open_handle()


def test_memory_read_asks_for_the_rest_until_it_has_all_or_reaches_the_end(tree):
    fake(tree).results.update(ram(10_240, 4096))
    assert memory_handle(tree).read(0, 6000) == (bytes(range(256)) * 40)[:6000]
    assert [(a["gpa"], a["size"]) for _, a in fake(tree).requests] == [(0, 6000), (4096, 1904)]
    fake(tree).requests.clear()
    assert len(memory_handle(tree, "vm1").read(8000, 4096)) == 2240  # short: past the end
    assert [(a["vm"], a["gpa"]) for _, a in fake(tree).requests] == [
        ("vm1", 8000), ("vm1", 10_240)]


def test_memory_write_repeats_until_every_byte_is_written(tree):
    fake(tree).results.update(ram(10_240, 3000))
    handle = memory_handle(tree)
    assert handle.write(100, b"x" * 7000) == 7000
    assert [(a["gpa"], len(a["data"])) for _, a in fake(tree).requests] == [
        (100, 7000), (3100, 4000), (6100, 1000)]
    assert handle.read(100, 7000) == b"x" * 7000


def test_a_memory_fault_reaches_the_reader_with_its_errno(tree):
    fake(tree).errors["memory_read"] = errno.EIO
    with pytest.raises(OSError) as e:
        memory_handle(tree).read(0, 10)
    assert e.value.errno == errno.EIO


def holed_ram(hole: int, chunk: int) -> dict[str, Any]:
    """Backend results for RAM that ends (or has a hole) at `hole`: EIO there, as vmio."""
    def read_(vm: str, gpa: int, size: int) -> bytes:
        if gpa >= hole:
            raise OSError(errno.EIO, "not guest RAM")
        return bytes(min(size, chunk, hole - gpa))

    def write_(vm: str, gpa: int, data: bytes) -> int:
        if gpa >= hole:
            raise OSError(errno.EIO, "not guest RAM")
        return min(len(data), chunk, hole - gpa)

    return {"memory_read": read_, "memory_write": write_}


def test_memory_io_that_reaches_a_hole_is_short_as_mem_rw():
    tree = Tree(FakeBackend(snapshot(vm_snapshot("vm0", VM0_DIR))), Params())
    fake(tree).results.update(holed_ram(10_000, 4096))
    handle = memory_handle(tree)
    assert handle.write(10_000 - 16, b"x" * 32) == 16
    assert len(handle.read(10_000 - 16, 32)) == 16
    assert handle.write(0, b"y" * 20_000) == 10_000  # several requests, then the hole
    assert len(fake(tree).requests[-1][1]["data"]) == 20_000 - 10_000


@pytest.mark.parametrize("op", ["read", "write"])
def test_memory_io_that_moves_nothing_fails_with_eio(op):
    tree = Tree(FakeBackend(snapshot(vm_snapshot("vm0", VM0_DIR))), Params())
    fake(tree).results.update(holed_ram(10_000, 4096))
    handle = memory_handle(tree)
    with pytest.raises(OSError) as e:
        handle.read(10_000, 32) if op == "read" else handle.write(10_000, b"x" * 32)
    assert e.value.errno == errno.EIO


def test_memory_file_size_is_the_end_of_guest_ram():
    tree = Tree(FakeBackend(snapshot(vm_snapshot("vm0", VM0_DIR, ram_end=0x10010000))), Params())
    node = lookup(tree, "/vm0/memory")
    assert isinstance(node, BinaryFile)
    assert node.size(current(tree)) == 0x10010000
    assert node.size(snapshot()) == 0  # the VM is gone


def dirty_log_handle(tree: Tree, slot: int):
    node = lookup(tree, f"/vm0/dirty_log/{slot}")
    assert isinstance(node, BinaryFile)
    return node.open_handle()


def test_a_dirty_log_read_at_offset_0_harvests_and_later_offsets_continue_that_bitmap(tree):
    bitmaps = iter([b"\x01\x02\x03\x04", b"\x05\x06\x07\x08"])
    fake(tree).results["dirty_log"] = lambda vm, slot: next(bitmaps)
    handle = dirty_log_handle(tree, 3)
    assert handle.read(0, 2) == b"\x01\x02"
    assert handle.read(2, 100) == b"\x03\x04"
    assert handle.read(4, 100) == b""
    assert fake(tree).requests == [("dirty_log", {"vm": "vm0", "slot": 3})]
    assert handle.read(0, 4) == b"\x05\x06\x07\x08"
    assert len(fake(tree).requests) == 2


def test_a_dirty_log_read_past_offset_0_before_any_harvest_reads_nothing(tree):
    assert dirty_log_handle(tree, 0).read(8, 8) == b""
    assert fake(tree).requests == []


def test_a_dirty_log_handle_refuses_writes(tree):
    with pytest.raises(OSError) as e:
        dirty_log_handle(tree, 0).write(0, b"\0")
    assert e.value.errno == errno.EACCES
    assert fake(tree).requests == []


# -- vms: the VMs, one line each; create and destroy lines -----------------------------------


def test_vms_lists_one_line_per_vm_with_its_state_and_configuration(tree):
    snap = snapshot(
        vm_snapshot("vm0", VM0_DIR, config=VmConfig("vm0", 64, 1, 0, "kernel")),
        vm_snapshot("vm7", VM1_DIR, state="paused", config=VmConfig("vm7", 1024, 4, 9, None)))
    assert read(tree, "/vms", snap) == (b"vm0 running mem=64M vcpus=1 seed=0 workload=kernel\n"
                                        b"vm7 paused mem=1G vcpus=4 seed=9 workload=none\n")
    assert read(tree, "/vms", snapshot()) == b""


@pytest.mark.parametrize(("mem_mb", "shown"), [(64, "64M"), (1024, "1G"), (1536, "1536M"),
                                               (3072, "3G"), (1 << 20, "1T"), (3 << 19, "1536G")])
def test_vms_shows_a_size_in_the_largest_unit_that_keeps_it_whole(tree, mem_mb, shown):
    """As `create` takes it, and as a user wrote it: a 1 TiB VM is `mem=1T`, not 1048576M."""
    snap = snapshot(vm_snapshot("vm7", VM1_DIR, config=VmConfig("vm7", mem_mb, 1, 0, None)))
    assert read(tree, "/vms", snap) == f"vm7 running mem={shown} vcpus=1 seed=0 workload=none\n".encode()
    assert mem_size(shown) == mem_mb


@pytest.mark.parametrize(("line", "request_"), [
    (b"create vm5\n", ("create", {"name": "vm5"})),
    (b"create vm5 mem=32M vcpus=2 seed=3 workload=kernel\n",
     ("create", {"name": "vm5", "mem_mb": 32, "vcpus": 2, "seed": 3, "workload": "kernel"})),
    (b"create vm12 workload=none seed=18446744073709551615 mem=1G",
     ("create", {"name": "vm12", "workload": "none", "seed": 2**64 - 1, "mem_mb": 1024})),
    (b"create vm999999 mem=512 vcpus=1024", ("create", {"name": "vm999999", "mem_mb": 512,
                                                        "vcpus": 1024})),
    (b"create vm1 mem=2GiB workload=stream", ("create", {"name": "vm1", "mem_mb": 2048,
                                                         "workload": "stream"})),
    (b"create vm1 workload=memslot_churn", ("create", {"name": "vm1", "workload": "memslot_churn"})),
    (b"destroy vm5\n", ("destroy", {"name": "vm5"})),
    (b"destroy vm0", ("destroy", {"name": "vm0"})),  # refused by the simulation (EPERM)
])
def test_a_vms_line_becomes_one_create_or_destroy_request(tree, line, request_):
    store(tree, "/vms", line)
    assert fake(tree).requests == [request_]


@pytest.mark.parametrize("line", [
    b"", b"\n", b"create", b"create\n", b"destroy", b"create vm5\n\n", b"create  vm5",
    b"create vm5 ", b" create vm5", b"Create vm5", b"start vm5", b"create vm5\ndestroy vm5",
    b"create VM5", b"create vm05", b"create vm", b"create vm-5", b"create foo", b"create vm1234567",
    b"create vm5 mem", b"create vm5 mem=", b"create vm5 mem=0", b"create vm5 mem=64K",
    b"create vm5 mem=-64M", b"create vm5 mem=lots", b"create vm5 mem=1M mem=2M",
    b"create vm5 vcpus=0", b"create vm5 vcpus=1025", b"create vm5 vcpus=0x2", b"create vm5 vcpus=two",
    b"create vm5 seed=-1", b"create vm5 seed=18446744073709551616", b"create vm5 seed=1.5",
    b"create vm5 workload=bogus", b"create vm5 workload=", b"create vm5 workload=Kernel",
    b"create vm5 colour=red", b"create vm5 =3", b"destroy vm5 now", b"destroy vm5 mem=1M",
    b"destroy vm05", b"create vm5\0", b"destroy\n",
])
def test_a_bad_vms_line_fails_with_einval_and_sends_nothing(tree, line):
    assert refused(tree, "/vms", line) == errno.EINVAL


def test_a_destroyed_vms_nodes_are_dropped_and_a_new_vm_of_that_name_gets_fresh_ones(tree):
    vm1_state = lookup(tree, "/vm1/state")
    assert children(tree, "/", snapshot(vm_snapshot("vm0", VM0_DIR))) == [
        "parameters", "kvm", "vms", "tracing", "vm0"]
    assert "vm1" not in tree._vm_dirs
    again = snapshot(vm_snapshot("vm0", VM0_DIR), vm_snapshot("vm1", "4242-12"))
    assert lookup(tree, "/vm1/state", again) is not vm1_state
    assert read(tree, "/vm1/state", again) == b"running\n"


# -- the shadow tables on view: rendered by the simulation at open ----------------------------


def test_mmu_directory_holds_pages_and_walk(tree):
    assert children(tree, "/vm0/mmu") == ["pages", "walk"]
    assert lookup(tree, "/vm0/mmu").mode == 0o755
    assert (lookup(tree, "/vm0/mmu/pages").mode, lookup(tree, "/vm0/mmu/walk").mode) == (0o444, 0o644)
    assert isinstance(lookup(tree, "/vm0/mmu/walk"), BinaryFile)


@pytest.mark.parametrize(("path", "op", "vm"), [
    ("/vm0/mmu/pages", "mmu_pages", "vm0"), ("/vm1/mmu/pages", "mmu_pages", "vm1"),
    (f"/kvm/{VM0_DIR}/mmu_rmaps_stat", "mmu_rmaps_stat", "vm0"),
    (f"/kvm/{VM1_DIR}/mmu_rmaps_stat", "mmu_rmaps_stat", "vm1"),
])
def test_a_view_file_is_the_simulations_text_asked_for_at_each_render(tree, path, op, vm):
    fake(tree).results[op] = lambda vm: f"text of {vm}\n"
    assert read(tree, path) == f"text of {vm}\n".encode()
    assert read(tree, path) == f"text of {vm}\n".encode()
    assert fake(tree).requests == [(op, {"vm": vm})] * 2


def test_mmu_rmaps_stat_has_the_kernels_0644_but_no_store(tree):
    node = lookup(tree, f"/kvm/{VM0_DIR}/mmu_rmaps_stat")
    assert isinstance(node, File) and (node.mode, node.writable) == (0o644, False)
    assert refused(tree, f"/kvm/{VM0_DIR}/mmu_rmaps_stat", b"0\n") == errno.EACCES


def test_a_view_file_of_a_vm_the_simulation_no_longer_has_fails_with_its_errno(tree):
    fake(tree).errors["mmu_pages"] = errno.ENOENT
    with pytest.raises(OSError) as e:
        read(tree, "/vm0/mmu/pages")
    assert e.value.errno == errno.ENOENT


def walk_handle(tree: Tree, vm: str = "vm0"):
    node = lookup(tree, f"/{vm}/mmu/walk")
    assert isinstance(node, BinaryFile)
    return node.open_handle()


@pytest.mark.parametrize(("data", "args"), [
    (b"0x1000", {"gva": 0x1000, "vcpu": 0}), (b"1000\n", {"gva": 0x1000, "vcpu": 0}),
    (b"0XFFFF888000001000 vcpu=3\n", {"gva": 0xFFFF888000001000, "vcpu": 3}),
    (b"ffffffffffffffff vcpu=1023", {"gva": (1 << 64) - 1, "vcpu": 1023}),
])
def test_a_walk_write_is_one_mmu_walk_request(tree, data, args):
    fake(tree).results["mmu_walk"] = "walked\n"
    handle = walk_handle(tree)
    assert handle.write(0, data) == len(data)
    assert fake(tree).requests == [("mmu_walk", {"vm": "vm0", **args})]


@pytest.mark.parametrize("data", [
    b"", b"\n", b"0x", b"x1000", b"0x1000\n\n", b" 0x1000", b"0x1000 ", b"0x10000000000000000",
    b"0x1000 vcpu=", b"0x1000 vcpu=01", b"0x1000 vcpu=-1", b"0x1000 cpu=1", b"0x1000  vcpu=1",
    b"0x1000 vcpu=1 vcpu=2", b"-0x1000", b"0x1000\0", b"g000",
])
def test_a_bad_walk_line_fails_with_einval_and_sends_nothing(tree, data):
    with pytest.raises(OSError) as e:
        walk_handle(tree).write(0, data)
    assert e.value.errno == errno.EINVAL
    assert fake(tree).requests == []


def test_each_walk_handle_reads_the_walk_of_its_own_address(tree):
    fake(tree).results["mmu_walk"] = lambda vm, gva, vcpu: f"walk {gva:#x} on {vcpu}\n"
    a, b = walk_handle(tree), walk_handle(tree)
    a.write(0, b"0x1000\n")
    b.write(0, b"0x2000 vcpu=1\n")
    assert a.read(0, 4096) == b"walk 0x1000 on 0\n"
    assert b.read(0, 4096) == b"walk 0x2000 on 1\n"
    assert a.read(5, 4096) == b"0x1000 on 0\n"  # later offsets continue in that text
    # A handle that wrote nothing walks the address last written through any handle.
    assert walk_handle(tree).read(0, 4096) == b"walk 0x2000 on 1\n"
    assert walk_handle(tree, "vm1").read(0, 4096) == b""  # each VM's file keeps its own


def test_a_walk_the_simulation_refuses_fails_the_write_and_keeps_the_address(tree):
    fake(tree).results["mmu_walk"] = lambda vm, gva, vcpu: f"walk {gva:#x}\n"
    handle = walk_handle(tree)
    handle.write(0, b"0x1000")
    fake(tree).errors["mmu_walk"] = errno.EINVAL  # no such vCPU
    with pytest.raises(OSError) as e:
        handle.write(0, b"0x2000 vcpu=7")
    assert e.value.errno == errno.EINVAL
    del fake(tree).errors["mmu_walk"]
    assert handle.read(0, 100) == b"walk 0x1000\n"
    assert walk_handle(tree).read(0, 100) == b"walk 0x1000\n"


# -- tracing/ (docs/tracing.md) -------------------------------------------------------------

TRACE_EVENTS = ("kvmmmu:kvm_mmu_get_page", "kvmmmu:kvm_mmu_set_spte")


def traced(tree: Tree) -> Snapshot:
    return dataclasses.replace(current(tree), trace_events=TRACE_EVENTS)


def test_tracing_layout_follows_the_snapshots_events(tree):
    snap = traced(tree)
    assert children(tree, "/tracing") == ["available_events", "set_event", "events", "tracing_on",
                                          "buffer_size_kb", "trace", "trace_pipe", "per_cpu"]
    assert children(tree, "/tracing/per_cpu", snap) == ["cpu0"]  # no VM config: one CPU
    two = dataclasses.replace(snap, vms=(
        vm_snapshot("vm0", VM0_DIR, config=VmConfig("vm0", 64, 1, 0, "kernel")),
        vm_snapshot("vm7", VM1_DIR, config=VmConfig("vm7", 64, 3, 0, None))))
    assert children(tree, "/tracing/per_cpu", two) == ["cpu0", "cpu1", "cpu2"]  # vCPU indices
    assert children(tree, "/tracing/per_cpu/cpu2", two) == ["stats"]
    assert lookup(tree, "/tracing/per_cpu/cpu2/stats", two).mode == 0o444
    assert children(tree, "/tracing/events", snap) == ["enable", "kvmmmu"]
    assert children(tree, "/tracing/events/kvmmmu", snap) == [
        "enable", "kvm_mmu_get_page", "kvm_mmu_set_spte"]
    assert children(tree, "/tracing/events/kvmmmu/kvm_mmu_get_page", snap) == [
        "enable", "filter", "format"]
    assert lookup(tree, "/tracing/events/kvmmmu/kvm_mmu_get_page/format", snap).mode == 0o444
    assert isinstance(lookup(tree, "/tracing/trace_pipe"), PipeFile)


def test_tracing_files_are_read_and_written_by_request(tree):
    fake(tree).results["tracefs_read"] = lambda **args: f"{args}"
    assert read(tree, "/tracing/tracing_on") == b"{'action': 'read', 'file': 'tracing_on'}"
    fake(tree).requests.clear()
    store(tree, "/tracing/set_event", b"kvmmmu:*\n")
    lookup(tree, "/tracing/trace").truncate()
    assert fake(tree).requests == [
        ("tracefs", {"action": "write", "file": "set_event", "text": "kvmmmu:*\n"}),
        ("tracefs", {"action": "truncate", "file": "trace"})]


@pytest.mark.parametrize("path, data", [
    ("/tracing/events/enable", b"2\n"), ("/tracing/events/enable", b"y"),
    ("/tracing/tracing_on", b"on\n"), ("/tracing/buffer_size_kb", b"0\n"),
    ("/tracing/buffer_size_kb", b"-4\n")])
def test_tracing_number_writes_are_checked_before_any_request(tree, path, data):
    assert refused(tree, path, data) == errno.EINVAL


@pytest.mark.parametrize("flags", [os.O_RDONLY | os.O_NONBLOCK, os.O_RDONLY])
def test_trace_pipe_read_of_an_empty_pipe_is_eagain(tree, flags):
    """An empty pipe is EAGAIN for every open; only a blocking one (`blocks`) is then made to
    wait, by the FUSE adapter (tests/test_fs_tracing.py)."""
    fake(tree).results["tracefs_read"] = ""
    handle = lookup(tree, "/tracing/trace_pipe").open_flags(flags)
    assert handle.blocks == (not flags & os.O_NONBLOCK)
    with pytest.raises(OSError) as e:
        handle.read(0, 4096)
    assert e.value.errno == errno.EAGAIN
    fake(tree).results["tracefs_read"] = "line\n"
    assert handle.read(0, 4096) == b"line\n"
    assert fake(tree).requests[-1] == ("tracefs_read", {"action": "pipe", "size": 4096})
