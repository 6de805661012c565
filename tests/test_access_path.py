"""The vCPU access path's fast forms against the straightforward ones they stand for.

- The processor's walk (`Vcpu._hw_walk`) descends through plain table entries with one test
  each: it must give what the complete per-level checks give — the same TLB entry, #PF error
  code and A/D updates — for present, absent, reserved-bit, large and MMIO sptes alike.
- The fast page fault's walk (`fast_pf_get_last_sptep`) is the last step of
  `KvmMmu.shadow_walk`.
- An emulated access whose gva hits the MMIO info cache goes to the device without trying
  guest memory (vcpu_mmio_gva_to_gpa returns 1), as a walked one does only after finding no
  memslot.
- A TLB miss's walk calls vcpu_enter_guest() only when it has something to do, and an
  observer listening is such a thing: it hears the guest entered before each #PF exit.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

import mmud
from mmud.campaign.zap_guest import MMIO_VA, Guest
from mmud.kvm.memslot import Memslot
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.fast_pf import fast_pf_get_last_sptep
from mmud.kvm.mmu.observer import MmuObserver
from mmud.kvm.mmu.page import ShadowPage
from mmud.kvm.vcpu import _HOST_RSVD, _HW_ERROR_CODE, TlbEntry, Vcpu
from mmud.x86.paging import PAGE_SHIFT, PFERR_PRESENT_MASK, PFERR_RSVD_MASK, pt_index

RSVD_BIT = 1 << 51


def reference_hw_walk(vcpu: Vcpu, gva: int, kind: int) -> TlbEntry | int:
    """The processor's walk as the definition: every level's checks, in order, and the
    leaf's gfn from the shadow page's own accessor."""
    sp = vcpu.mmu.root
    assert sp is not None
    level = sp.level
    pages = vcpu.mmu.kvm_mmu.pool.pages
    while True:
        spte = sp.spt[pt_index(gva, level)]
        if not spte & S.PT_PRESENT_MASK:
            return _HW_ERROR_CODE[kind]
        if spte & _HOST_RSVD[level * 2 + (spte >> 7 & 1)]:
            return _HW_ERROR_CODE[kind] | PFERR_PRESENT_MASK | PFERR_RSVD_MASK
        if level == 1 or spte & S.PT_PAGE_SIZE_MASK:
            break
        sp = pages[S.spte_child_index(spte)]
        level -= 1
    entry = vcpu._tlb_fill(gva, kind, sp, spte)
    if entry is None:
        return _HW_ERROR_CODE[kind] | PFERR_PRESENT_MASK
    return (*entry[:4], sp.gfn_of(pt_index(gva, level)))  # the gfn as kvm_mmu_page_get_gfn() gives it


def table_sptes(vcpu: Vcpu, gva: int) -> list[tuple[ShadowPage, int]]:
    """(sp, index) of every MMU-present entry on gva's path, from the root down to a leaf or
    to an entry spoil() gave a reserved bit (its address is no shadow page's)."""
    path: list[tuple[ShadowPage, int]] = []
    sp = vcpu.mmu.root
    while sp is not None:
        i = pt_index(gva, sp.level)
        spte = sp.spt[i]
        if not spte & S.SPTE_MMU_PRESENT:
            break
        path.append((sp, i))
        if sp.level == 1 or spte & (S.PT_PAGE_SIZE_MASK | RSVD_BIT):
            break
        sp = vcpu.mmu.kvm_mmu.pool.pages[S.spte_child_index(spte)]
    return path


def kernel_vm(seed: int) -> mmud.VM:
    vm = mmud.VM(mem_mb=64, seed=seed, workload="kernel")
    vm.step(3000)
    vm.vcpus[0].enter_guest()
    return vm


def mapped_gvas(vcpu: Vcpu) -> list[int]:
    """The page of every present leaf spte below the root, in walk order."""
    found: list[int] = []
    pages = vcpu.mmu.kvm_mmu.pool.pages

    def visit(sp: ShadowPage, base: int) -> None:
        for i in range(512):
            spte = sp.spt[i]
            if not spte & S.SPTE_MMU_PRESENT:
                continue
            gva = base | i << (PAGE_SHIFT + 9 * (sp.level - 1))
            if sp.level == 1 or spte & S.PT_PAGE_SIZE_MASK:
                found.append(gva - (1 << 48) if gva >> 47 else gva)  # sign-extended
            else:
                visit(pages[S.spte_child_index(spte)], gva)

    assert vcpu.mmu.root is not None
    visit(vcpu.mmu.root, 0)
    return found


def probe_addresses(vcpu: Vcpu, rng: random.Random) -> list[int]:
    """Pages the shadow tables map, their neighbours, and addresses nothing maps."""
    mapped = mapped_gvas(vcpu)
    mapped = rng.sample(mapped, min(300, len(mapped)))
    gvas = [gva | rng.randrange(4096) & ~7 for gva in mapped]
    gvas += [gva + 4096 for gva in mapped[::7]]
    gvas += [rng.randrange(1 << 47) & ~7 for _ in range(100)]
    return [gva & ((1 << 64) - 1) for gva in gvas]


# How spoil() makes an entry of a path irregular: (level of the entry, bits set, bits cleared).
SPOILS = (
    (3, RSVD_BIT, 0),  # a reserved bit in a table entry
    (2, 0, S.PT_PRESENT_MASK),  # an absent table entry
    (1, RSVD_BIT, 0),  # a reserved bit in the leaf
    (4, S.PT_PAGE_SIZE_MASK, 0),  # PS where it is reserved
    (2, S.PT_PAGE_SIZE_MASK, 0),  # a table entry that is a leaf: reserved bits in its address
)


def spoil(vcpu: Vcpu, gva: int, how: int) -> tuple[ShadowPage, int, int] | None:
    """Make one entry of gva's path irregular (SPOILS[how]); the entry (sp, index, old
    spte), to put back."""
    path = table_sptes(vcpu, gva)
    if len(path) < 4:
        return None
    level, set_bits, clear_bits = SPOILS[how]
    sp, i = path[4 - level]
    old = sp.spt[i]
    sp.spt[i] = old & ~clear_bits | set_bits
    return sp, i, old


def comparable(entry: TlbEntry) -> tuple[object, ...]:
    """A TLB entry without the host buffer objects (each VM has its own)."""
    u64, index, allowed, array, gfn = entry
    return index, allowed, gfn, len(u64), array.shape


def outcome(walk: Callable[[Vcpu, int, int], TlbEntry | int], vcpu: Vcpu, gva: int, kind: int) -> object:
    """What a walk gives: a comparable TLB entry, a #PF error code, or the exception."""
    try:
        result = walk(vcpu, gva, kind)
    except (AssertionError, IndexError) as error:
        return type(error)
    return result if isinstance(result, int) else comparable(result)


def assert_same_walks(fast: Vcpu, slow: Vcpu, gvas: list[int]) -> set[str]:
    """Both walks give the same for every kind of access to gvas; the outcomes seen."""
    seen = set()
    for gva in gvas:
        for kind in range(8):
            expected = outcome(reference_hw_walk, slow, gva, kind)
            assert outcome(Vcpu._hw_walk, fast, gva, kind) == expected, (hex(gva), kind)
            seen.add("tlb entry" if isinstance(expected, tuple) else "raised" if isinstance(expected, type)
                     else "rsvd" if expected & PFERR_RSVD_MASK  # type: ignore[operator]
                     else "refused" if expected & PFERR_PRESENT_MASK else "absent")  # type: ignore[operator]
    return seen


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_walk_gives_what_every_levels_checks_give(seed: int) -> None:
    fast, slow = kernel_vm(seed), kernel_vm(seed)
    vf, vs = fast.vcpus[0], slow.vcpus[0]
    gvas = probe_addresses(vf, random.Random(seed))
    assert probe_addresses(vs, random.Random(seed)) == gvas
    assert assert_same_walks(vf, vs, gvas) == {"tlb entry", "refused", "absent"}
    seen = set()
    for k, gva in enumerate(gvas[:50]):
        spoilt = spoil(vf, gva, k % len(SPOILS)), spoil(vs, gva, k % len(SPOILS))
        seen |= assert_same_walks(vf, vs, [gva, gva ^ 8, gva + 4096])
        for entry in spoilt:
            if entry is not None:
                sp, i, old = entry
                sp.spt[i] = old
    assert {"rsvd", "absent"} <= seen
    chunks = zip(fast.mmu.pool.spt_chunks, slow.mmu.pool.spt_chunks, strict=True)
    assert all((a == b).all() for a, b in chunks), "the walks set the same A/D bits"
    assert {vpn: comparable(e) for vpn, e in vf.tlb.items()} == {
        vpn: comparable(e) for vpn, e in vs.tlb.items()}


def test_the_walk_reaches_an_mmio_spte_as_a_reserved_bit_fault() -> None:
    guest = Guest(64)
    vcpu = guest.vcpu
    vcpu.read_u64(MMIO_VA, user=True)  # the fault installs the MMIO spte
    for kind in range(8):
        expected = reference_hw_walk(vcpu, MMIO_VA, kind)
        assert expected == _HW_ERROR_CODE[kind] | PFERR_PRESENT_MASK | PFERR_RSVD_MASK
        assert vcpu._hw_walk(MMIO_VA, kind) == expected


@pytest.mark.parametrize("seed", [1, 2])
def test_the_fast_page_faults_walk_is_the_shadow_walks_last_step(seed: int) -> None:
    vm = kernel_vm(seed)
    vcpu = vm.vcpus[0]
    mmu, root = vcpu.mmu.kvm_mmu, vcpu.mmu.root
    assert root is not None
    gvas = probe_addresses(vcpu, random.Random(seed))
    for gva in gvas:
        *_, last = mmu.shadow_walk(root, gva)
        assert fast_pf_get_last_sptep(root, mmu.pool.pages, gva) == last
    for k, gva in enumerate(gvas[:40]):  # a leaf above level 1 ends both walks there
        spoilt = spoil(vcpu, gva, 3 + k % 2)
        *_, last = mmu.shadow_walk(root, gva)
        assert fast_pf_get_last_sptep(root, mmu.pool.pages, gva) == last
        if spoilt is not None:
            sp, i, old = spoilt
            sp.spt[i] = old


def test_a_cached_mmio_gva_goes_to_the_device_without_trying_guest_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cached = Guest(64)
    cached.vcpu.write_u64(MMIO_VA + 8, 0x1234, user=True)
    assert cached.vcpu.read_u64(MMIO_VA + 8, user=True) == 0x1234
    vcpu = cached.vcpu
    gpa, mmio = vcpu._emulated_gpa(MMIO_VA + 8, 2)
    assert mmio
    vcpu.mmu.clear_mmio_info_any()
    assert vcpu._emulated_gpa(MMIO_VA + 8, 2) == (gpa, False), "the guest walk: not known MMIO"
    vcpu.read_u64(MMIO_VA + 8, user=True)  # the RSVD fault caches the MMIO info again

    tried: list[int] = []
    memslots = cached.vm.memslots
    read, write = memslots.read_u64, memslots.write_u64

    def read_u64(gpa: int) -> int | None:
        tried.append(gpa)
        return read(gpa)

    def write_u64(gpa: int, value: int) -> Memslot | None:
        tried.append(gpa)
        return write(gpa, value)

    monkeypatch.setattr(memslots, "read_u64", read_u64)
    monkeypatch.setattr(memslots, "write_u64", write_u64)
    exits = vcpu.stat["mmio_exits"]
    vcpu.write_u64(MMIO_VA + 16, 7, user=True)
    assert vcpu.read_u64(MMIO_VA + 16, user=True) == 7
    assert tried == [] and vcpu.stat["mmio_exits"] == exits + 2


class _EntriesAndExits(MmuObserver):
    """Hears each vCPU's guest entries and its VM exits, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[int, str]] = []

    def vcpu_enter_guest(self, vcpu_index: int) -> None:
        self.events.append((vcpu_index, "entry"))

    def handle_exception_nmi(self, vcpu_index: int, address: int, error_code: int) -> None:
        self.events.append((vcpu_index, "#PF exit"))

    def handle_cr(self, vcpu_index: int, cr: int, value: int) -> None:
        self.events.append((vcpu_index, "CR exit"))

    def handle_wrmsr(self, vcpu_index: int, msr: int, value: int) -> None:
        self.events.append((vcpu_index, "WRMSR exit"))


def test_an_observer_hears_the_guest_entered_before_each_page_fault_exit() -> None:
    """A #PF exit comes from the guest running, so an observer (the kvm_entry tracepoint)
    hears vcpu_enter_guest between a vCPU's previous exit and it. A TLB miss's walk skips
    the call when it has nothing to do, but not while an observer listens — after an
    emulated access or a CR write, for one, the vCPU has not been entered again."""
    vm = mmud.VM(mem_mb=64, vcpus=2, seed=3, workload="kernel",
                 params={"address_space_isolation": "0"})
    heard = _EntriesAndExits()
    vm.mmu.attach(heard)
    vm.step(3000)
    last: dict[int, str] = {}
    pf_exits = 0
    for vcpu, event in heard.events:
        if event == "#PF exit":
            pf_exits += 1
            assert last.get(vcpu, "entry") == "entry"
        last[vcpu] = event
    assert pf_exits > 1000 and {"CR exit"} <= {event for _, event in heard.events}
