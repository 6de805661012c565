"""Property tests: random guest operations, then the shadow MMU must be self-consistent
(vm.audit(): rmaps, write protection, parent links, unsync counts, translations) and every
access must behave as the SDM's walk of the guest's current tables says — except where the
guest edited a table and has not flushed yet, where x86 allows the old translation."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmud.campaign.fuzz_guest import FLIPS
from tests.guest_tables import NX, P, U, W, check_access, idx, new_vm

# Two PTs under one PD, one PT under another PD in another PDPT.
VAS = [
    0x0000_0000_0040_0000,
    0x0000_0000_0040_1000,
    0x0000_0000_0040_7000,
    0x0000_0000_005F_F000,
    0x0000_0000_0060_0000,
    0x0000_0000_0060_3000,
    0x0000_0040_0020_0000,
    0x0000_0040_0020_5000,
]
ALIAS = 1 << 39  # PML4 slot +1 in address space B: the same PDPT, read-only
FLAGS = [P | W | U, P | U, P | W, P, 0, P | W | U | NX, P | W | U | (1 << 49)]
KINDS = [
    dict(),
    dict(write=True),
    dict(user=True),
    dict(write=True, user=True),
    dict(fetch=True),
    dict(fetch=True, user=True),
]

ops = st.one_of(
    st.tuples(
        st.just("pte"), st.integers(0, len(VAS) - 1), st.integers(0, 15), st.sampled_from(FLAGS)
    ),
    st.tuples(
        st.just("pde"),
        st.integers(0, len(VAS) - 1),
        st.sampled_from([P | W | U, P | U, P | W | U | NX]),
    ),
    st.tuples(
        st.just("access"), st.integers(0, len(VAS) - 1), st.sampled_from(KINDS), st.booleans()
    ),
    st.tuples(st.just("invlpg"), st.integers(0, len(VAS) - 1)),
    st.tuples(st.just("cr3"), st.integers(0, 1)),
    st.tuples(st.just("mode"), st.sampled_from(["wp", "nxe", "smep", "smap", "ac"])),
    st.tuples(st.just("zap"), st.sampled_from(("fast", "slow", "legacy"))),
    st.tuples(st.just("vcpu"), st.integers(0, 1)),
)


class World:
    def __init__(self, budget: int | None):
        self.vm, self.gt, vcpu0 = new_vm(vcpus=2)
        if budget:
            self.vm.set_nr_mmu_pages(budget)
        gt, vm = self.gt, self.vm
        self.frames = [gt.alloc_data() for _ in range(16)]
        for va in VAS:
            gt.map(va, self.frames[0], flags=P | W | U)
        # Address space B: its own PML4 with the kernel direct map and an RO alias of A's PDPT.
        self.pml4_b = gt.alloc_table()
        for slot in range(512):
            entry = vm.read_u64(gt.pml4 + 8 * slot)
            if entry:
                vm.write_u64(self.pml4_b + 8 * slot, entry)
        entry = vm.read_u64(gt.pml4 + 8 * idx(VAS[0], 4))
        vm.write_u64(self.pml4_b + 8 * (idx(VAS[0], 4) + 1), entry & ~W)
        self.cr3s = [gt.pml4, self.pml4_b]
        for v in vm.vcpus:
            v.cr3 = gt.pml4
        self.vcpu = vcpu0
        self.stale: dict[int, set[int]] = {0: set(), 1: set()}  # per vCPU: unflushed VAs

    def all_vas(self):
        return VAS + [va + ALIAS for va in VAS if idx(va, 4) == idx(VAS[0], 4)]

    def mark_stale(self, vas):
        for s in self.stale.values():
            s.update(vas)

    def apply(self, op):
        vm, gt, vcpu = self.vm, self.gt, self.vcpu
        kind = op[0]
        if kind == "pte":
            _, k, frame, flags = op
            pte = gt.entry_gpa(VAS[k], 1)
            gt.guest_write_entry(vcpu, pte, self.frames[frame] | flags)
            self.mark_stale({VAS[k], VAS[k] + ALIAS})
        elif kind == "pde":
            _, k, flags = op
            pde = gt.entry_gpa(VAS[k], 2)
            old = vm.read_u64(pde)
            gt.guest_write_entry(vcpu, pde, (old & ~(P | W | U | NX)) | flags)
            self.mark_stale(
                {
                    va
                    for va in self.all_vas()
                    if va >> 21 == VAS[k] >> 21 or (va - ALIAS) >> 21 == VAS[k] >> 21
                }
            )
        elif kind == "access":
            _, k, access_kind, alias = op
            va = VAS[k] + (
                ALIAS
                if alias and vcpu.cr3 == self.pml4_b and idx(VAS[k], 4) == idx(VAS[0], 4)
                else 0
            )
            if va in self.stale[vcpu.index]:
                vcpu.access(va, **access_kind)
            else:
                check_access(vm, vcpu, va, **access_kind)
        elif kind == "invlpg":
            for va in (VAS[op[1]], VAS[op[1]] + ALIAS):
                vcpu.invlpg(va)
                self.stale[vcpu.index].discard(va)
        elif kind == "cr3":
            vcpu.cr3 = self.cr3s[op[1]]
            self.stale[vcpu.index].clear()
        elif kind == "mode":
            register, bit = FLIPS[op[1]]
            setattr(vcpu, register, getattr(vcpu, register) ^ bit)
        elif kind == "zap":
            vm.zap_all(op[1])
        elif kind == "vcpu":
            self.vcpu = vm.vcpus[op[1]]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=1, max_size=60), st.sampled_from([None, 64]))
def test_random_guest_operations_keep_the_mmu_consistent(program, budget):
    world = World(budget)
    for n, op in enumerate(program):
        world.apply(op)
        if n % 5 == 4:
            assert world.vm.audit() == [], (n, op)
    assert world.vm.audit() == []
    # After a flush on every vCPU, every address behaves as the guest's tables say.
    for vcpu in world.vm.vcpus:
        vcpu.cr3 = vcpu.cr3
        world.vcpu = vcpu
        world.stale[vcpu.index].clear()
        for va in world.all_vas():
            for kind in KINDS:
                check_access(world.vm, vcpu, va, **kind)
    assert world.vm.audit() == []
