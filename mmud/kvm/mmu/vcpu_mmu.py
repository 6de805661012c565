"""A vCPU's MMU (`struct kvm_mmu`, `vcpu->arch.mmu`): its roots, paging mode and fault entry.

The VM's shadow MMU (`KvmMmu`: shadow pages, hash, rmaps, page budget) is shared by every
vCPU; what belongs to one vCPU lives here, as in the kernel:

- the root and its CR3 (`root_hpa`, `root_pgd`) and the cache of previous roots;
- the paging mode the shadow pages are built for (`mmu_role`: CR0.WP, CR4.SMEP/SMAP,
  EFER.NXE), the permission table `update_permission_bitmask()` computes from it, and the
  guest's reserved-bit masks (`guest_rsvd_check`);
- the MMIO info cache (`vcpu->arch.mmio_gva/access/gfn/generation`, kept in `vcpu->arch`
  by the kernel, used only by the MMU).

The entry from a #PF VM exit, kvm_mmu_page_fault(), is page_fault.py's: it sits above every
path it dispatches to, while this object sits below them all.

The MMU never reaches into the vCPU's registers or TLB: what it needs of the CPU side is the
`VcpuOps` protocol (requests, TLB flushes, dirty marking, #PF injection), which
mmud/kvm/vcpu.py implements. The modules of this package take a `VcpuMmu`, never a `Vcpu`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from mmud.kvm.memslot import KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
from mmud.kvm.mmu import spte as S
from mmud.kvm.mmu.page import (
    ROLE_CR0_WP,
    ROLE_GPTE_IS_8_BYTES,
    ROLE_NXE,
    ROLE_SMAP_ANDNOT_WP,
    ROLE_SMEP_ANDNOT_WP,
    ShadowPage,
    make_role,
)
from mmud.x86.paging import (
    ACC_ALL,
    CR0_WP,
    CR4_SMAP,
    CR4_SMEP,
    EFER_NXE,
    PAGE_MASK,
    PT64_ROOT_4LEVEL,
    X86_EFLAGS_AC,
    permission_table,
    rsvd_table,
)

if TYPE_CHECKING:
    from mmud.kvm.mmu.mmu import KvmMmu

KVM_MMU_NUM_PREV_ROOTS = 3  # cached (cr3, root) pairs for fast CR3 switches (roots.py)

_allowed_cache: dict[tuple[tuple[int, ...], int], int] = {}


def allowed_kinds(permissions: tuple[int, ...], access: int) -> int:
    """The access kinds (write | user << 1 | fetch << 2) that rights `access` allow."""
    key = (permissions, access)
    mask = _allowed_cache.get(key)
    if mask is None:
        mask = sum(1 << kind for kind in range(8) if not permissions[kind] >> access & 1)
        _allowed_cache[key] = mask
    return mask


class VcpuOps(Protocol):
    """What the MMU asks of its vCPU (mmud/kvm/vcpu.py): the CPU side of KVM."""

    index: int
    stat: dict[str, int]

    @property
    def cr3(self) -> int: ...

    def request_tlb_flush(self) -> None:
        """kvm_make_request(KVM_REQ_TLB_FLUSH): flush before the next guest entry."""

    def request_mmu_sync(self) -> None:
        """KVM_REQ_MMU_SYNC: sync the unsync pages below the root before the next entry."""

    def make_request_mmu_reload(self) -> None:
        """KVM_REQ_MMU_RELOAD: drop the roots before the next entry."""

    def flush_tlb_current(self) -> None:
        """kvm_x86_tlb_flush_current(): empty the TLB now (a new root is loaded)."""

    def flush_tlb_gva(self, gva: int) -> None:
        """The TLB entry of one address (INVLPG)."""

    def mark_page_dirty(self, gfn: int) -> None: ...

    def inject_page_fault(self, gva: int, error_code: int) -> None:
        """Reflect a #PF into the guest."""

    def preempt(self) -> None:
        """A point where the vCPU thread may lose its CPU (other tasks run)."""

    def lock_mmu(self) -> None:
        """spin_lock(&kvm->mmu_lock)."""


class VcpuMmu:
    """struct kvm_mmu of one vCPU, over the VM's shadow MMU `kvm_mmu`."""

    def __init__(self, kvm_mmu: KvmMmu, vcpu: VcpuOps, mmio_caching: bool) -> None:
        self.kvm_mmu = kvm_mmu
        self.memslots = kvm_mmu.memslots  # the generation the MMIO cache is checked against
        self.vcpu = vcpu
        self.stat = vcpu.stat
        self.mmio_caching = mmio_caching  # the module's mmio_caching parameter (0444)
        self.root: ShadowPage | None = None
        self.root_cr3 = 0
        self.prev_roots: list[tuple[int, ShadowPage | None]] = [(0, None)] * KVM_MMU_NUM_PREV_ROOTS
        self.fixed: tuple[ShadowPage, int] | None = None  # the leaf the last fault installed or fixed
        self.fast_pf_gfn: int | None = None  # between a fast page fault's cmpxchg and mark_page_dirty
        # vcpu->arch.mmio_gva / mmio_access / mmio_gfn / mmio_generation
        self.mmio_gva = 0
        self.mmio_access = 0
        self.mmio_gfn = 0
        self.mmio_gen = 0
        self.cr0_wp = self.nxe = self.smep = self.smap = self.ac = False
        self.base_role = 0
        self.guest_permissions: tuple[int, ...] = ()
        self.hw_permissions: tuple[int, ...] = ()
        self.hw_allowed: tuple[int, ...] = ()  # by spte rights (spte_access): kinds allowed
        self.rsvd_table: tuple[int, ...] = ()

    # --- the paging mode (kvm_init_mmu) ------------------------------------------------------

    def init_context(self, cr0: int, cr4: int, efer: int, rflags: int) -> None:
        """The mode the shadow pages are built for, from the guest's control registers."""
        self.cr0_wp = bool(cr0 & CR0_WP)
        self.nxe = bool(efer & EFER_NXE)
        self.smep = bool(cr4 & CR4_SMEP)
        self.smap = bool(cr4 & CR4_SMAP)
        self.update_permission_bitmask(rflags)
        self.rsvd_table = rsvd_table(self.nxe)
        role = ROLE_GPTE_IS_8_BYTES
        if self.nxe:
            role |= ROLE_NXE
        if self.cr0_wp:
            role |= ROLE_CR0_WP
        elif self.smep:
            role |= ROLE_SMEP_ANDNOT_WP
        if not self.cr0_wp and self.smap:
            role |= ROLE_SMAP_ANDNOT_WP
        self.base_role = role

    def update_permission_bitmask(self, rflags: int) -> None:
        """The guest's permission table, and the processor's for sptes (host CR0.WP=1).

        RFLAGS.AC enters the table (SMAP lets a supervisor access through when AC=1)."""
        self.ac = bool(rflags & X86_EFLAGS_AC)
        self.guest_permissions = permission_table(self.cr0_wp, self.smep, self.smap, self.ac)
        self.hw_permissions = permission_table(True, self.smep, self.smap, self.ac)
        self.hw_allowed = tuple(allowed_kinds(self.hw_permissions, access) for access in range(8))

    def root_role(self) -> int:
        return make_role(self.base_role, PT64_ROOT_4LEVEL, False, ACC_ALL)

    def all_roots(self) -> list[ShadowPage]:
        found = [self.root] if self.root is not None else []
        return found + [sp for _, sp in self.prev_roots if sp is not None]

    def hw_allows(self, spte: int, error_code: int) -> bool:
        """Whether the processor would let the faulting access through spte."""
        kind = 1 | (error_code >> 1 & 2) | (error_code >> 2 & 4)
        return bool(self.hw_allowed[S.spte_access(spte)] >> kind & 1)

    # --- the MMIO info cache -------------------------------------------------------------------

    def cache_mmio_info(self, gva: int, gfn: int, access: int) -> None:
        gen = self.memslots.generation
        if gen & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
            return
        self.mmio_gva = gva & PAGE_MASK
        self.mmio_access = access
        self.mmio_gfn = gfn
        self.mmio_gen = gen

    def clear_mmio_info(self, gva: int) -> None:
        if self.mmio_gva == gva & PAGE_MASK:
            self.mmio_gva = 0

    def clear_mmio_info_any(self) -> None:
        self.mmio_gva = 0

    def match_mmio_gva(self, gva: int) -> bool:
        return (
            self.mmio_gva != 0
            and self.mmio_gen == self.memslots.generation
            and self.mmio_gva == gva & PAGE_MASK
        )
