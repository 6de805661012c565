"""Trace events: kvmmmu and kvm (mmud/kvm/trace, docs/tracing.md).

The expected texts are the kernel's TP_printk format strings of arch/x86/kvm/mmu/mmutrace.h,
arch/x86/kvm/trace.h and include/trace/events/kvm.h (v5.16) applied by hand to the field
values, not the output of mmud's renderers.
"""

from __future__ import annotations

import pytest

import mmud
from mmud.kvm.module import KvmModule
from mmud.kvm.trace.events import EVENTS, select
from mmud.kvm.trace.filter import FilterError
from mmud.kvm.trace.ring import CpuRing, Record
from mmud.kvm.trace.tracer import format_line
from mmud.kvm.trace.tracefs import TraceFs

NO_ISOLATION = {"address_space_isolation": "0"}

# (event, field values in the header's order, the expected TP_printk text)
RENDER_CASES = [
    # "vcpu %u, rip 0x%lx"
    ("kvm_entry", (1, 0), "vcpu 1, rip 0x0"),
    # "vcpu %u reason %s%s%s rip 0x%lx info1 0x%016llx info2 0x%016llx intr_info 0x%08x
    # error_code 0x%08x": VMX (isa 1) names the basic reason from VMX_EXIT_REASONS
    ("kvm_exit", (0, 0, 1, 0xFFFF888000007000, 0, 0x80000B0E, 2, 0),
     "vcpu 0 reason EXCEPTION_NMI rip 0x0 info1 0xffff888000007000 info2 0x0000000000000000 "
     "intr_info 0x80000b0e error_code 0x00000002"),
    ("kvm_exit", (28, 0, 1, 3, 0, 0, 0, 1),
     "vcpu 1 reason CR_ACCESS rip 0x0 info1 0x0000000000000003 info2 0x0000000000000000 "
     "intr_info 0x00000000 error_code 0x00000000"),
    ("kvm_exit", (14, 0, 1, 0x7F0000001000, 0, 0, 0, 0),
     "vcpu 0 reason INVLPG rip 0x0 info1 0x00007f0000001000 info2 0x0000000000000000 "
     "intr_info 0x00000000 error_code 0x00000000"),
    ("kvm_exit", (32, 0, 1, 0, 0, 0, 0, 0),
     "vcpu 0 reason MSR_WRITE rip 0x0 info1 0x0000000000000000 info2 0x0000000000000000 "
     "intr_info 0x00000000 error_code 0x00000000"),
    # "address %lx error_code %x"
    ("kvm_page_fault", (0xFFFFC90000000008, 0xB), "address ffffc90000000008 error_code b"),
    # "cr_%s %x = 0x%lx"
    ("kvm_cr", (1, 3, 0x1234000), "cr_write 3 = 0x1234000"),
    ("kvm_cr", (0, 0, 0x80010011), "cr_read 0 = 0x80010011"),
    # "%x:%llx:%s (%s)%s", csbase, rip, __print_hex(insn, len), emul flags, failed
    ("kvm_emulate_insn", (0, 0, 0, 0, 9, 0), "0:0: (prot64)"),
    ("kvm_emulate_insn", (0xFFFFFFFF81000000, 0x10, 3, 0x078948, 1 | 4, 1),
     "10:ffffffff81000000:48 89 07 (prot32) failed"),
    # "mmio %s len %u gpa 0x%llx val 0x%llx", kvm_trace_symbol_mmio
    ("kvm_mmio", (0, 8, 0xFF08D000, 0), "mmio unsatisfied-read len 8 gpa 0xff08d000 val 0x0"),
    ("kvm_mmio", (1, 8, 0xFF08D000, 0x1F), "mmio read len 8 gpa 0xff08d000 val 0x1f"),
    ("kvm_mmio", (2, 4, 0xFF08D008, 0xABC), "mmio write len 4 gpa 0xff08d008 val 0xabc"),
    # "addr %llx pferr %x %s", __print_flags(pferr, "|", P W U RSVD F)
    ("kvm_mmu_pagetable_walk", (0x7F0012345000, 0x1B), "addr 7f0012345000 pferr 1b P|W|RSVD|F"),
    # "pte %llx level %u"
    ("kvm_mmu_paging_element", (0x8000000012345067, 1), "pte 8000000012345067 level 1"),
    # "gpa %llx"
    ("kvm_mmu_set_accessed_bit", (0x1FF8,), "gpa 1ff8"),
    ("kvm_mmu_set_dirty_bit", (0xCF30,), "gpa cf30"),
    # "pferr %x %s": unknown bits print as 0x%lx after the names; none set prints nothing
    ("kvm_mmu_walker_error", (0x22,), "pferr 22 W|0x20"),
    ("kvm_mmu_walker_error", (0,), "pferr 0 "),
    ("kvm_mmu_walker_error", (0x7,), "pferr 7 P|W|U"),
    # "%s %s", KVM_MMU_PAGE_PRINTK(), created ? "new" : "existing"
    # role 0x3711: level 1, gpte_is_8_bytes, access 7, efer_nx, cr0_wp
    ("kvm_mmu_get_page", (1, 0x1234, 0x3711, 0, 0, 1),
     "sp gen 1 gfn 1234 l1 8-byte q0 wux nxe ad root 0 sync new"),
    ("kvm_mmu_get_page", (0, 0x1234, 0x3711, 1, 0, 0),
     "sp gen 0 gfn 1234 l1 8-byte q0 wux nxe ad root 1 sync existing"),
    # role 0x10b92: level 2, 8-byte, direct, access 3, invalid, !efer_nx, ad_disabled
    ("kvm_mmu_sync_page", (0, 0x200, 0x10B92, 2, 1),
     "sp gen 0 gfn 200 l2 8-byte q0 direct w-x invalid !nxe !ad root 2 unsync"),
    # role 0x421: level 1, 4-byte gptes, quadrant 1, access 4
    ("kvm_mmu_unsync_page", (0, 0x5, 0x421, 0, 0),
     "sp gen 0 gfn 5 l1 4-byte q1 -u- !nxe ad root 0 sync"),
    ("kvm_mmu_prepare_zap_page", (1, 0x0, 0x1004, 3, 0),
     "sp gen 1 gfn 0 l4 4-byte q0 --- nxe ad root 3 sync"),
    # "sptep:%p gfn %llx access %x gen %x"
    ("mark_mmio_spte", (0xFFFF888200001008, 0xFEE00, 6, 0x1F),
     "sptep:ffff888200001008 gfn fee00 access 6 gen 1f"),
    # "addr:%llx gfn %llx access %x"
    ("handle_mmio_page_fault", (0xFEE00000, 0xFEE00, 6), "addr:fee00000 gfn fee00 access 6"),
    # "vcpu %d gva %llx error_code %s sptep %p old %#llx new %llx spurious %d fixed %d"
    # (RET_PF_FIXED 3, RET_PF_SPURIOUS 4; %#llx prints a zero without 0x)
    ("fast_page_fault", (1, 0x7000, 3, 0xFFFF888200002038, 0, 0x8000000100007E63, 3),
     "vcpu 1 gva 7000 error_code P|W sptep ffff888200002038 old 0 new 8000000100007e63 spurious 0 fixed 1"),
    ("fast_page_fault", (0, 0x8000, 3, 0xFFFF888200002040, 0x8000000100008E61, 0x8000000100008E63, 4),
     "vcpu 0 gva 8000 error_code P|W sptep ffff888200002040 old 0x8000000100008e61 "
     "new 8000000100008e63 spurious 1 fixed 0"),
    ("fast_page_fault", (0, 0x8000, 3, 0, 0, 0, 2),
     "vcpu 0 gva 8000 error_code P|W sptep 0000000000000000 old 0 new 0 spurious 0 fixed 0"),
    # "kvm-mmu-valid-gen %u used_pages %x"
    ("kvm_mmu_zap_all_fast", (1, 0x1A), "kvm-mmu-valid-gen 1 used_pages 1a"),
    # "spte %llx kvm_gen %x spte-gen %x valid %d"
    ("check_mmio_spte", (0x12, 0x10, 0x8003E0000FEE0087),
     "spte 8003e0000fee0087 kvm_gen 12 spte-gen 10 valid 0"),
    ("check_mmio_spte", (0x12, 0x12, 0x8003E0000FEE0097),
     "spte 8003e0000fee0097 kvm_gen 12 spte-gen 12 valid 1"),
    # "gfn %llx spte %llx (%s%s%s%s) level %d at %llx": r, spte & W, x, u (-1: nothing)
    ("kvm_mmu_set_spte", (7, 0x8000000100007E63, 0x200000003038, 1, 1, 0, 0),
     "gfn 7 spte 8000000100007e63 (rw--) level 1 at 200000003038"),
    ("kvm_mmu_set_spte", (8, 0x100008A25, 0x200000003040, 1, 1, 1, 1),
     "gfn 8 spte 100008a25 (r-xu) level 1 at 200000003040"),
    ("kvm_mmu_set_spte", (8, 0x100008A27, 0x200000003040, 2, 1, 1, -1),
     "gfn 8 spte 100008a27 (rwx) level 2 at 200000003040"),
    # "gfn %llx pfn %llx level %d"
    ("kvm_mmu_spte_requested", (7, 0x100007, 1), "gfn 7 pfn 100007 level 1"),
]


@pytest.mark.parametrize(("name", "values", "expected"), RENDER_CASES)
def test_event_text_is_the_kernel_printk(name: str, values: tuple[int, ...], expected: str) -> None:
    assert EVENTS[name].text(values) == expected


def test_every_event_has_a_render_case() -> None:
    assert {case[0] for case in RENDER_CASES} == set(EVENTS)


def test_fields_sit_at_their_c_offsets() -> None:
    get_page = EVENTS["kvm_mmu_get_page"]
    assert [(f.name, f.ctype, f.offset, f.size, f.signed) for f in get_page.fields] == [
        ("mmu_valid_gen", "__u8", 8, 1, False), ("gfn", "__u64", 16, 8, False),
        ("role", "__u32", 24, 4, False), ("root_count", "__u32", 28, 4, False),
        ("unsync", "bool", 32, 1, False), ("created", "bool", 33, 1, False)]
    assert get_page.size == 40
    set_spte = EVENTS["kvm_mmu_set_spte"]
    assert [(f.name, f.offset, f.signed) for f in set_spte.fields][-4:] == [
        ("level", 32, False), ("r", 33, False), ("x", 34, False), ("u", 35, True)]
    text = EVENTS["kvm_mmu_walker_error"].format_file()
    assert "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n" in text
    assert "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n" in text
    assert "\tfield:__u32 pferr;\toffset:8;\tsize:4;\tsigned:0;\n" in text


def test_line_format_is_ftraces_default() -> None:
    # "%16s-%-7d " "[%03d] " irqs-off/need-resched/hardsoft/preempt/migrate " %5lu.%06lu" ": "
    record = Record(EVENTS["kvm_mmu_zap_all_fast"], (0, 3), 1_234_567_890, 0, 1001, "vcpu0", 0, 1)
    assert format_line(record) == ("           vcpu0-1001    [000] ...1.     1.234568: "
                                   "kvm_mmu_zap_all_fast: kvm-mmu-valid-gen 0 used_pages 3")
    record = Record(EVENTS["fast_page_fault"], (0, 0x8000, 3, 0, 0, 0, 2), 20_000, 3, 1004, "vcpu3", 1, 0)
    assert format_line(record).startswith(
        "           vcpu3-1004    [003] d....     0.000020: fast_page_fault: ")


KVM_EVENTS = {"kvm_entry", "kvm_exit", "kvm_page_fault", "kvm_cr", "kvm_emulate_insn", "kvm_mmio"}


def test_selection() -> None:
    assert select("*:*") == set(EVENTS) == select(["kvmmmu:*", "kvm:*"])
    assert select("kvmmmu") == select("kvmmmu:*") == set(EVENTS) - KVM_EVENTS
    assert select("kvm") == KVM_EVENTS
    assert select("kvmmmu:kvm_mmu_get_page") == {"kvm_mmu_get_page"}
    assert select("kvm:kvm_exit") == {"kvm_exit"}
    assert select("kvm_mmu_set_*_bit") == {"kvm_mmu_set_accessed_bit", "kvm_mmu_set_dirty_bit"}
    with pytest.raises(ValueError):
        select("kvmmmu:kvm_exit")


def test_kvm_exit_and_emulate_insn_formats() -> None:
    exit_ = EVENTS["kvm_exit"]
    assert exit_.system == "kvm" and exit_.size == 64
    assert [(f.name, f.ctype, f.offset, f.size) for f in exit_.fields] == [
        ("exit_reason", "unsigned int", 8, 4), ("guest_rip", "unsigned long", 16, 8),
        ("isa", "u32", 24, 4), ("info1", "u64", 32, 8), ("info2", "u64", 40, 8),
        ("intr_info", "u32", 48, 4), ("error_code", "u32", 52, 4), ("vcpu_id", "unsigned int", 56, 4)]
    text = EVENTS["kvm_emulate_insn"].format_file()
    assert "\tfield:__u8 insn[15];\toffset:21;\tsize:15;\tsigned:0;\n" in text
    assert "\tfield:__u8 flags;\toffset:36;\tsize:1;\tsigned:0;\n" in text


def test_print_fmt_shows_macros_expanded() -> None:
    get_page = EVENTS["kvm_mmu_get_page"].format_file()
    assert ('print fmt: "%s %s", ({ const char *saved_ptr = trace_seq_buffer_ptr(p); ' in get_page)
    assert "role.word = REC->role; " in get_page and "KVM_MMU_PAGE_PRINTK" not in get_page
    assert get_page.endswith('saved_ptr; }), REC->created ? "new" : "existing"\n')
    walk = EVENTS["kvm_mmu_pagetable_walk"].format_file()
    assert '{ (1U << 0), "P" }, { (1U << 1), "W" }' in walk and "PFERR_" not in walk
    fast = EVENTS["fast_page_fault"].format_file()  # TRACE_DEFINE_ENUM: numbers, not names
    assert fast.endswith("REC->ret == 4, REC->ret == 3\n") and "RET_PF" not in fast


def _vm(seed: int = 5) -> mmud.VM:
    return mmud.VM(mem_mb=64, seed=seed, workload="kernel", vcpus=2, params=NO_ISOLATION)


def test_nothing_attached_without_enabled_events() -> None:
    vm = _vm()
    assert vm.mmu.obs is None
    with vm.trace(["kvmmmu:kvm_mmu_get_page"]):
        assert vm.mmu.obs is not None
    assert vm.mmu.obs is None
    vm.step(50)
    assert vm.mmu.obs is None


def test_one_event_enabled_shows_only_it() -> None:
    vm = _vm()
    with vm.trace(["kvmmmu:kvm_mmu_get_page"]) as t:
        vm.step(300)
        events = list(t)
    assert events and {e.name for e in events} == {"kvm_mmu_get_page"}
    assert {e.vcpu for e in events} == {0, 1}
    e = events[0]
    assert e.text.startswith("sp gen 0 gfn ") and e.text.endswith(" new")
    assert e.fields["created"] == 1 and e.line.endswith(f"kvm_mmu_get_page: {e.text}")


def test_kvm_events_follow_the_vcpus_exits() -> None:
    """Each vCPU alternates entry and exit; a #PF exit is followed by kvm_page_fault of the
    same address and error code; CR writes and MMIO accesses show with their values."""
    vm = _vm()
    with vm.trace(["kvm:*"]) as t:
        vm.step(3000)
        events = list(t)
    assert {e.name for e in events} == KVM_EVENTS - {"kvm_entry"} | {"kvm_entry"}
    stats = vm.stats
    assert sum(e.name == "kvm_exit" for e in events) == stats["exits"]
    assert sum(e.name == "kvm_emulate_insn" for e in events) == stats["insn_emulation"]
    for vcpu in (0, 1):
        mine = [e for e in events if e.vcpu == vcpu]
        switches = [e.name for e in mine if e.name in ("kvm_entry", "kvm_exit")]
        assert all(a != b for a, b in zip(switches, switches[1:], strict=False)), vcpu
        for a, b in zip(mine, mine[1:], strict=False):
            if a.name == "kvm_exit" and a.fields["exit_reason"] == 0:
                assert b.name == "kvm_page_fault"
                assert (b.fields["fault_address"], b.fields["error_code"]) == \
                    (a.fields["info1"], a.fields["error_code"])
                assert a.fields["intr_info"] == 0x80000B0E
            if a.name == "kvm_exit" and a.fields["exit_reason"] == 28:
                assert b.name == "kvm_cr" and b.fields["cr"] == a.fields["info1"]
    cr3 = [e for e in events if e.name == "kvm_cr" and e.fields["cr"] == 3]
    assert cr3 and all(e.fields["rw"] == 1 for e in cr3)
    assert cr3[-1].fields["val"] in {v.cr3 for v in vm.vcpus} | {e.fields["val"] for e in cr3}
    mmio = [e for e in events if e.name == "kvm_mmio"]
    reads = [e for e in mmio if e.fields["type"] == 1]
    assert reads and all(e.fields["len"] == 8 for e in mmio)
    for e in reads:  # each read was first unsatisfied: it went out to the VMM's device
        before = mmio[mmio.index(e) - 1]
        assert before.fields["type"] == 0 and before.fields["gpa"] == e.fields["gpa"]


def _trace_text(seed: int) -> str:
    vm = _vm(seed)
    with vm.trace() as t:
        vm.step(400)
        return t.text()


def test_same_seed_same_trace_text() -> None:
    first = _trace_text(3)
    assert first == _trace_text(3)
    assert first != _trace_text(4)
    assert "kvm_mmu_pagetable_walk: addr " in first and "kvm_mmu_set_spte: gfn " in first


def test_tracing_does_not_change_the_run() -> None:
    quiet, traced = _vm(9), _vm(9)
    with traced.trace(["*:*"], filter=None):
        quiet.step(800)
        traced.step(800)
    assert quiet.stats == traced.stats
    assert quiet.clock_ns == traced.clock_ns


def test_ring_overwrites_the_oldest_and_counts_them() -> None:
    walk = EVENTS["kvm_mmu_pagetable_walk"]  # 24-byte payload: 28 bytes a record, 145 a page
    ring = CpuRing(0, size=4096)  # two pages
    assert ring.nr_pages == 2
    for n in range(1000):
        ring.write(Record(walk, (n, 2), n, 0, 1001, "vcpu0", 0, 0))
    assert ring.overrun == 725 and ring.entries == 275
    record, missed = ring.consume()
    assert (record.values[0], missed) == (725, 725)
    assert ring.consume()[1] == 0


def test_reader_sees_lost_events_line() -> None:
    vm = _vm()
    with vm.trace(["kvmmmu:kvm_mmu_paging_element"]) as t:
        t.instance.buffer_size_kb = 4
        vm.step(600)
        lines = list(t.lines())
    assert t.lost > 0 and t.overrun == t.lost
    lost = [line for line in lines if "LOST" in line]
    assert lost and all(line.startswith("CPU:") and line.endswith(" EVENTS]") for line in lost)


def test_default_buffer_size_is_1408_kb() -> None:
    vm = _vm()
    with vm.trace() as t:
        assert t.instance.buffer_size_kb == 1408


def test_filter_on_numeric_fields() -> None:
    vm = _vm()
    with vm.trace(["kvmmmu:kvm_mmu_paging_element"], filter="(level == 4 || level == 1) && pte & 0x1") as t:
        vm.step(300)
        events = list(t)
    assert events and {e.fields["level"] for e in events} == {1, 4}
    assert all(e.fields["pte"] & 1 for e in events)
    with vm.trace(["kvmmmu:kvm_mmu_get_page"], filter="common_pid == 1002") as t:
        vm.step(300)
        assert {e.vcpu for e in t} == {1}
    for bad in ("level ==", "nosuch == 1", "level = 1", "(level == 1"):
        with pytest.raises(FilterError):
            vm.trace(["kvmmmu:kvm_mmu_paging_element"], filter=bad)
    assert vm.mmu.obs is None


def test_pids_and_the_vmm_thread() -> None:
    module = KvmModule(NO_ISOLATION)
    first = mmud.VM(mem_mb=64, seed=1, workload="kernel", module=module)
    second = mmud.VM(mem_mb=64, seed=1, workload="kernel", vcpus=2, module=module)
    first.step(10)
    with second.trace(["kvmmmu:kvm_mmu_get_page", "kvmmmu:kvm_mmu_zap_all_fast"]) as t:
        assert first.mmu.obs is None  # the session records the second VM only
        second.step(100)
        second.zap_all("fast")
        events = list(t)
    assert {(e.task, e.pid, e.cpu) for e in events if e.vcpu is not None} <= {
        ("vcpu0", 2001, 0), ("vcpu1", 2002, 1)}
    zap = [e for e in events if e.name == "kvm_mmu_zap_all_fast"]
    assert len(zap) == 1 and zap[0].line.startswith("             vmm-2000    [000] ...1. ")


# --- tracefs (mmud/kvm/trace/tracefs.py) ---------------------------------------------------------

def _tracefs() -> tuple[mmud.VM, TraceFs]:
    vm = _vm()
    return vm, TraceFs(vm.module.trace)


def test_format_file_ends_with_the_print_fmt_line() -> None:
    text = EVENTS["kvm_mmu_paging_element"].format_file()
    assert text.endswith('\n\nprint fmt: "pte %llx level %u", REC->pte, REC->level\n')


def test_tracefs_set_event_enable_and_tracing_on() -> None:
    vm, fs = _tracefs()
    fs.write("set_event", "kvmmmu:kvm_mmu_get_page kvmmmu:kvm_mmu_set_spte\n")
    assert fs.read("set_event") == "kvmmmu:kvm_mmu_get_page\nkvmmmu:kvm_mmu_set_spte\n"
    assert fs.read("events/kvmmmu/enable") == "X\n"
    fs.write("set_event", "!kvmmmu:kvm_mmu_set_spte")
    with pytest.raises(OSError):
        fs.write("set_event", "kvmmmu:nope")
    fs.truncate("set_event")
    assert fs.read("set_event") == "" and fs.read("events/enable") == "0\n"
    fs.write("events/kvmmmu/kvm_mmu_get_page/enable", "1\n")
    fs.write("tracing_on", "0\n")
    vm.zap_all("fast")
    vm.step(200)
    assert fs.pipe(4096) == ""
    fs.write("tracing_on", "1\n")
    vm.zap_all("fast")
    vm.step(200)
    assert "kvm_mmu_get_page: sp gen" in fs.read("trace")


def test_tracefs_pipe_returns_whole_lines_up_to_size() -> None:
    vm, fs = _tracefs()
    fs.write("events/enable", "1")
    vm.step(300)
    first = fs.pipe(1)  # one line even when it does not fit
    assert first.count("\n") == 1
    chunk = fs.pipe(1000)
    assert chunk.endswith("\n") and len(chunk) <= 1000 and chunk != first
    fs.write("events/enable", "0")
    while fs.pipe(1 << 20):
        pass
    assert fs.pipe(4096) == ""


def test_tracefs_bad_filter_leaves_the_event_unfiltered_with_the_error() -> None:
    vm, fs = _tracefs()
    fs.write("events/kvmmmu/kvm_mmu_get_page/filter", "gfn == 0x12345\n")
    assert fs.read("events/kvmmmu/kvm_mmu_get_page/filter") == "gfn == 0x12345\n"
    with pytest.raises(OSError):
        fs.write("events/kvmmmu/kvm_mmu_get_page/filter", "gfn == 1 && (level")
    assert "kvm_mmu_get_page" not in fs.top.filters
    assert "\nparse_error: " in fs.read("events/kvmmmu/kvm_mmu_get_page/filter")
    fs.write("events/kvmmmu/kvm_mmu_get_page/filter", "0")
    assert fs.read("events/kvmmmu/kvm_mmu_get_page/filter") == "none\n"
