"""Injectable MMU bugs: wrong code paths inside the MMU, armed one at a time.

Each bug is a branch at the place a real kernel bug would be — `if mmu.bug == "…":` — never a
corruption of state from outside, so what the audit sees is what a real bug leaves behind.
An armed bug fires every time its code path runs. `Kvm.inject(name)` arms one ("none"
disarms); `vm0/inject` lists them with the armed one in brackets.

The `caught_by` column names the audit check that reports the bug (docs/audit.md has the
messages); tests/test_audit.py proves each, in full and in incremental scope.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bug:
    name: str
    where: str
    caught_by: str


BUGS: tuple[Bug, ...] = (
    Bug(
        "rmap_add_skipped",
        "mmu_set_spte() installs a leaf spte without rmap_add()",
        "audit_sptes_have_rmaps / check_mappings_rmap (no rmap for writable spte); rmap_exact",
    ),
    Bug(
        "write_protect_skipped",
        "kvm_mmu_get_page() does not write-protect a new level-1 table's gfn",
        "audit_write_protection (shadow page has writable mappings)",
    ),
    Bug(
        "wrong_pfn",
        "mmu_set_spte() maps the neighbouring host frame",
        "audit_mappings (levels … pfn … hpa … ent …n)",
    ),
    Bug(
        "sync_skipped",
        "mmu_sync_children() returns without syncing the unsync pages",
        "audit_spte_after_sync (meet unsync sp(…) after sync root.)",
    ),
    Bug(
        "unsync_nonleaf",
        "mmu_need_write_protect() ignores write tracking and unsyncs an upper-level table",
        "audit_mappings (unsync sp: … level = …)",
    ),
    Bug(
        "rmap_remove_skipped",
        "drop_spte() clears the spte but leaves it in the rmap",
        "rmap_exact (rmap of gfn … holds …, which does not map it)",
    ),
    Bug(
        "pte_write_ignored",
        "kvm_mmu_pte_write() leaves the written sptes as they were",
        "translation (spte … does not match gpte …)",
    ),
    Bug(
        "parent_unlink_skipped",
        "drop_parent_pte() clears the spte but leaves the parent link",
        "parent_links (sp … lists parent … which does not point at it)",
    ),
    Bug(
        "dirty_wp_before_snapshot",
        "a dirty-log harvest write-protects the dirty pages before it takes the bitmap",
        "dirty_log (dirty log: gfn … is clean but spte … is writable)",
    ),
    Bug(
        "dirty_wp_skipped",
        "a dirty-log harvest clears the bitmap without write-protecting the pages",
        "dirty_log (dirty log: gfn … is clean but spte … is writable)",
    ),
)
BUG_BY_NAME: dict[str, Bug] = {b.name: b for b in BUGS}
# A fault while switching address spaces: armed in a VM, fired by the isolation code.
ISOLATION_SWITCH_FAULT = "isolation_switch_fault"
INJECTABLE_BUGS = (*BUG_BY_NAME, ISOLATION_SWITCH_FAULT)


def render_choices(armed: str | None, names: tuple[str, ...] = tuple(BUG_BY_NAME)) -> str:
    """`none [rmap_add_skipped] …` — the armed one in brackets, like a block scheduler file."""
    return " ".join(f"[{n}]" if n == (armed or "none") else n for n in ("none", *names)) + "\n"
