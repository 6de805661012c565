"""The shadow tables on view, rendered in-process (mmud/kvm/mmu/view.py): vm<N>/mmu/pages,
vm<N>/mmu/walk and kvm/<pid>-<fd>/mmu_rmaps_stat, exact lines for hand-built guests."""

from __future__ import annotations

import numpy as np

from mmud.kvm.mmu import view
from mmud.kvm.mmu.page import (
    ROLE_DIRECT,
    ROLE_GPTE_IS_8_BYTES,
    ShadowPagePool,
    make_role,
)
from mmud.x86.paging import ACC_EXEC_MASK, ACC_USER_MASK, ACC_WRITE_MASK
from tests.guest_tables import DIRECT_VA, D, P, U, W, new_vm

VA = 0x400000
MMIO_VA = 0x600000
MMIO_GPA = 0x1000_0000  # above the 64 MiB of RAM: no memslot

WALK_HEAD = [
    "gva 0x0000000000400000 vcpu 0 cr3 0x10000",
    "guest walk:",
    "  L4 gpa 0x0000000000010000 gpte 0x0000000000013027 P W U A - -- -- addr 0x13000",
    "  L3 gpa 0x0000000000013000 gpte 0x0000000000014027 P W U A - -- -- addr 0x14000",
    "  L2 gpa 0x0000000000014010 gpte 0x0000000000015027 P W U A - -- -- addr 0x15000",
]
SHADOW_UPPER = [
    "shadow walk from root ffff888100000000:",
    "  L4 sp ffff888100000000[0] spte 0x0000200000001827 P W U -- A - ------------ "
    "------------- mmu-present child ffff888100000100",
    "  L3 sp ffff888100000100[0] spte 0x0000200000002827 P W U -- A - ------------ "
    "------------- mmu-present child ffff888100000200",
    "  L2 sp ffff888100000200[2] spte 0x0000200000003827 P W U -- A - ------------ "
    "------------- mmu-present child ffff888100000300",
]


def mapped_vm(access: dict | None = None):
    """A fresh VM with VA mapped user-writable, accessed once (a read unless `access`)."""
    vm, gt, vcpu = new_vm()
    pa = gt.map(VA, flags=P | W | U)
    assert not vcpu.access(VA, user=True, **(access or {})).fault
    return vm, gt, vcpu, pa


def lines(text: str) -> list[str]:
    assert text.endswith("\n")
    return text.splitlines()


# -- vm<N>/mmu/pages ----------------------------------------------------------------------------


def test_kvm_mmu_page_printk_decodes_the_role_as_the_kernel_tracepoint():
    pool = ShadowPagePool()
    sp = pool.alloc()
    sp.init(0x1234, make_role(ROLE_GPTE_IS_8_BYTES, 4, False, ACC_EXEC_MASK | ACC_WRITE_MASK
                              | ACC_USER_MASK) | (1 << 12), 1)
    sp.root_count = 2
    assert view.kvm_mmu_page_printk(sp) == \
        "sp gen 1 gfn 1234 l4 8-byte q0 wux nxe ad root 2 sync"
    sp.init(0xABC, make_role(0, 1, True, ACC_USER_MASK), 0x103)  # no NXE, direct
    sp.unsync = True
    sp.mark_invalid()
    assert sp.role & ROLE_DIRECT
    assert view.kvm_mmu_page_printk(sp) == \
        "sp gen 3 gfn abc l1 8-byte q0 direct -u- invalid !nxe ad root 0 unsync"
    sp.init(0x5, 2 | (ACC_WRITE_MASK << 8), 0)  # an indirect page without gpte_is_8_bytes
    assert view.kvm_mmu_page_printk(sp) == "sp gen 0 gfn 5 l2 4-byte q0 w-- !nxe ad root 0 sync"


def test_pages_lists_every_active_page_oldest_first_with_its_counts():
    vm, _gt, _vcpu, _pa = mapped_vm()
    assert lines(view.render_pages(vm.mmu)) == [
        "sp               unsync_children parents sptes kvm_mmu_page",
        "ffff888100000000               0       0     1 sp gen 0 gfn 10 l4 8-byte q0 wux nxe ad root 1 sync",
        "ffff888100000100               0       1     1 sp gen 0 gfn 13 l3 8-byte q0 wux nxe ad root 0 sync",
        "ffff888100000200               0       1     1 sp gen 0 gfn 14 l2 8-byte q0 wux nxe ad root 0 sync",
        "ffff888100000300               0       1     1 sp gen 0 gfn 15 l1 8-byte q0 wux nxe ad root 0 sync",
    ]


def test_pages_shows_an_unsync_page_and_its_parents_unsync_children():
    vm, gt, vcpu, pa = mapped_vm()
    gt.guest_write_entry(vcpu, gt.entry_gpa(VA), pa | P | U)  # the guest edits its leaf table
    rows = {line.split()[8]: line.split() for line in lines(view.render_pages(vm.mmu))[1:]
            if line.split()[7] == "gfn"}
    assert rows["15"][-1] == "unsync" and rows["14"][1] == "1"  # the L2 page counts its child


def test_pages_of_a_vm_without_shadow_pages_is_the_header():
    vm, _gt, _vcpu = new_vm()
    assert view.render_pages(vm.mmu) == view.PAGES_HEADER + "\n"


# -- vm<N>/mmu/walk -----------------------------------------------------------------------------


def test_walk_of_a_mapped_address_shows_both_walks_and_agrees():
    _vm, _gt, vcpu, _pa = mapped_vm()
    assert lines(view.render_walk(vcpu.mmu, VA)) == [
        *WALK_HEAD,
        "  L1 gpa 0x0000000000015000 gpte 0x0000000000400027 P W U A - -- -- addr 0x400000 "
        "gfn 0x400 wux",
        *SHADOW_UPPER,
        "  L1 sp ffff888100000300[0] spte 0x0000000100400a25 P - U -- A - ------------ "
        "host-writable mmu-present pfn 0x100400 -ux",
        "agree: gfn 0x400 is pfn 0x100400 in both; the spte allows -ux, the guest wux",
    ]


def test_walk_after_a_write_shows_the_dirty_gpte_and_the_writable_spte():
    _vm, _gt, vcpu, _pa = mapped_vm({"write": True})
    out = lines(view.render_walk(vcpu.mmu, VA))
    assert out[5] == ("  L1 gpa 0x0000000000015000 gpte 0x0000000000400067 P W U A D -- -- "
                      "addr 0x400000 gfn 0x400 wux")
    assert out[-2] == ("  L1 sp ffff888100000300[0] spte 0x0000000100400e67 P W U -- A D "
                       "mmu-writable host-writable mmu-present pfn 0x100400 wux")
    assert out[-1] == "agree: gfn 0x400 is pfn 0x100400 in both; the spte allows wux, the guest wux"


def test_walk_of_an_unmapped_address_stops_at_the_first_non_present_level_in_both():
    _vm, _gt, vcpu, _pa = mapped_vm()
    assert lines(view.render_walk(vcpu.mmu, VA + 0x1000)) == [
        "gva 0x0000000000401000 vcpu 0 cr3 0x10000",
        *WALK_HEAD[1:],
        "  L1 gpa 0x0000000000015008 gpte 0x0000000000000000 - - - - - -- -- not present",
        *SHADOW_UPPER,
        "  L1 sp ffff888100000300[1] spte 0x0000000000000000 - - - -- - - ------------ "
        "------------- ----------- not present",
        "agree: neither maps it (the guest walk stops at L1: not present)",
    ]
    out = lines(view.render_walk(vcpu.mmu, 0x7F00_0000_0000))
    assert out[2].endswith(" not present") and out[2].startswith("  L4 ")
    assert out[-2].startswith("  L4 sp ffff888100000000[254] ") and out[-2].endswith(" not present")


def test_walk_of_an_mmio_address_shows_the_mmio_spte_gfn_and_generation():
    vm, gt, vcpu = new_vm()
    gt.map(MMIO_VA, MMIO_GPA, flags=P | W | U)
    assert not vcpu.access(MMIO_VA, user=True).fault  # an MMIO exit; the spte is cached
    out = lines(view.render_walk(vcpu.mmu, MMIO_VA))
    gen = vm.memslots.generation
    assert out[5].endswith("addr 0x10000000 gfn 0x10000 wux")
    assert out[-2].startswith("  L1 sp ")
    assert out[-2].endswith(f" ----------- mmio gfn 0x10000 access -u- gen {gen}")
    assert out[-1] == f"agree: mmio at gfn 0x10000, generation {gen}"
    vm.set_memslot(5, 0x2000_0000, 0x10000)  # a new generation: the spte is stale
    assert view.render_walk(vcpu.mmu, MMIO_VA).splitlines()[-1] == (
        f"agree: mmio at gfn 0x10000, stale generation {gen} (memslots at "
        f"{vm.memslots.generation}: the next access rewalks it)")


def test_walk_through_a_2m_guest_page():
    _vm, _gt, vcpu = new_vm()
    gva = DIRECT_VA + 0x20_3000  # the direct map: 2 MiB pages, supervisor
    assert not vcpu.access(gva).fault
    out = lines(view.render_walk(vcpu.mmu, gva))
    assert out[4].endswith(" P W - A - PS -- addr 0x200000 (2M) gfn 0x203 w-x")
    assert out[-1].startswith("agree: gfn 0x203 is pfn ") and out[-1].endswith(", the guest w-x")


def test_walk_without_a_root_agrees_that_nothing_is_shadowed():
    _vm, gt, vcpu = new_vm()
    gt.map(VA)
    assert vcpu.mmu.root is None
    out = lines(view.render_walk(vcpu.mmu, VA))
    assert out[-2:] == ["shadow walk: no root loaded",
                        "agree: not shadowed yet (the next access faults it in)"]


def test_walk_reports_a_stale_spte_the_guest_changed_behind_the_mmus_back():
    vm, gt, vcpu, pa = mapped_vm({"write": True})
    gpa = gt.entry_gpa(VA)
    vm.write_u64(gpa, pa | P | U | D)  # a host write: no write tracking, W taken away
    assert view.render_walk(vcpu.mmu, VA).splitlines()[-1] == \
        "disagree: the spte allows wux, the guest only -ux"
    vm.write_u64(gpa, (pa + 0x1000) | P | W | U | D)  # another frame
    assert view.render_walk(vcpu.mmu, VA).splitlines()[-1] == \
        "disagree: the spte maps pfn 0x100400, gfn 0x401 is pfn 0x100401"
    vm.write_u64(gpa, pa | P | W | U)  # clean again, the spte still writable
    assert view.render_walk(vcpu.mmu, VA).splitlines()[-1] == \
        "disagree: the spte is writable but the gpte is not dirty"
    vm.write_u64(gpa, 0)
    assert view.render_walk(vcpu.mmu, VA).splitlines()[-1] == \
        "disagree: the spte maps pfn 0x100400, but the guest walk stops at L1: not present"


def test_walk_changes_neither_guest_memory_nor_the_mmu():
    vm, gt, vcpu, _pa = mapped_vm()
    gt.map(VA + 0x1000)  # mapped, never accessed: a real walk would set A
    slot = vm.memslots.lookup(0)
    ram, sptes = slot.backing.array.copy(), vm.mmu.pool.spt_array().copy()
    stats, cached = dict(vm.stats), vm.memslots._last
    vm.memslots._last = None
    for gva in (VA, VA + 0x1000, VA + 0x2000, DIRECT_VA, MMIO_VA):
        view.render_walk(vcpu.mmu, gva)
    assert np.array_equal(slot.backing.array, ram)
    assert np.array_equal(vm.mmu.pool.spt_array(), sptes)
    assert dict(vm.stats) == stats and vm.memslots._last is None
    vm.memslots._last = cached


def test_walk_names_a_non_canonical_address():
    _vm, _gt, vcpu, _pa = mapped_vm()
    first = view.render_walk(vcpu.mmu, 1 << 63).splitlines()[0]
    assert first == "gva 0x8000000000000000 vcpu 0 cr3 0x10000 (non-canonical: an access raises #GP)"


# -- kvm/<pid>-<fd>/mmu_rmaps_stat ----------------------------------------------------------------

RMAP_HEADER = "Rmap_Count:\t0\t1\t2-3\t4-7\t8-15\t16-31\t32-63\t64-127\t128-255\t256-511\t512-1023\t"


def row(name: str, counts: list[int]) -> str:
    return f"Level={name}:\t" + "".join(f"{c}\t" for c in counts)


def test_rmaps_stat_has_the_kernel_format_and_counts_the_chains():
    vm, gt, vcpu, pa = mapped_vm()
    # 16384 heads of 4 KiB, 32 of 2 MiB, 1 of 1 GiB for 64 MiB; one head holds one spte.
    assert lines(view.render_rmaps_stat(vm.memslots)) == [
        RMAP_HEADER,
        row("4K", [16383, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        row("2M", [32] + [0] * 10),
        row("1G", [1] + [0] * 10),
    ]
    for k in (1, 2):  # two more gvas of the same frame: a chain of 3
        gt.map(VA + 0x200000 * k, pa)
        assert not vcpu.access(VA + 0x200000 * k, user=True).fault
    gt.map(VA + 0x1000, pa + 0x1000)
    gt.map(VA + 0x201000, pa + 0x1000)
    for gva in (VA + 0x1000, VA + 0x201000):  # a chain of 2
        assert not vcpu.access(gva, user=True).fault
    log = view.rmaps_stat(vm.memslots)
    # ffs(pte_list_count()): 2 lands in "2-3", 3 in "1" (its lowest set bit), as in the kernel
    assert log[0][:3] == [16382, 1, 1] and sum(log[0][1:]) == 2
    heads = sum(int(np.count_nonzero(s.rmap.mapped())) for s in vm.memslots)
    assert sum(log[0][1:]) == heads


def test_rmaps_stat_buckets_follow_ffs_and_cap_at_the_last_column():
    assert [view._ffs(n) for n in (0, 1, 2, 3, 4, 6, 8, 1024)] == [0, 1, 2, 1, 3, 2, 4, 11]
    vm, _gt, _vcpu, _pa = mapped_vm()
    slot = vm.memslots.lookup(0)
    slot.rmap.head[7] = -2  # MANY: a hand-made chain of 1024 entries
    slot.rmap.desc[7] = list(range(1024))
    assert view.rmaps_stat(vm.memslots)[0][10] == 1
