"""vm<N>/memslots and vm<N>/zap_all: KVM_SET_USER_MEMORY_REGION and zap-all from a shell.

Both are simulator controls (Linux has no such files; a VMM makes the ioctls).  As every
store does (mmud/fs/nodes.py), the line is parsed here and a bad one fails with EINVAL
before anything reaches the simulation; whether the change is allowed (overlap: EEXIST,
size or alignment: EINVAL) is KVM's decision, taken by the simulation.
"""

from __future__ import annotations

import errno
from typing import Any

from mmud.daemon.protocol import Snapshot
from mmud.fs.nodes import Backend, RequestFile, choice_file
from mmud.uapi.params import ParamError, kstrtoull

# Action -> (how many numbers follow it, the words that may end the line -> log_dirty,
# whether one of those words must end it).
MEMSLOT_ACTIONS: dict[str, tuple[int, dict[str, bool], bool]] = {
    "add": (3, {"log_dirty": True}, False),
    "move": (2, {}, False),
    "flags": (1, {"log_dirty=0": False, "log_dirty=1": True}, True),
    "delete": (1, {}, False),
}
# vm<N>/zap_all: the 2013 fast zap as in v5.16, kvm_mmu_zap_all as since v5.1, and as before 2013
# (mmud.kvm.mmu.zap.ZAP_KINDS; the FUSE process does not import the simulation).
ZAP_KINDS = ("fast", "slow", "legacy")


def _number(word: str) -> int:
    """kstrtoull(word, 0), as debugfs integer files parse: 0x… hex, a leading 0 octal."""
    try:
        return kstrtoull(word, 0)
    except ParamError as e:
        raise OSError(e.errno, f"{word!r}: {e}") from None


def parse_memslot_line(data: bytes) -> dict[str, Any]:
    """`add ID GPA SIZE [log_dirty]`, `move ID GPA`, `flags ID log_dirty=0|1`, `delete ID`.

    One line (at most one trailing newline); numbers in the kernel's base-0 grammar.
    Returns the request's arguments: action, slot, and gpa/size/log_dirty where given.
    """
    text = data.decode("latin-1")
    line = text[:-1] if text.endswith("\n") else text
    words = line.split(" ")
    action, args = words[0], words[1:]
    if "\n" in line or action not in MEMSLOT_ACTIONS:
        raise OSError(errno.EINVAL, f"expected one of {', '.join(MEMSLOT_ACTIONS)}")
    count, flag_words, flag_required = MEMSLOT_ACTIONS[action]
    log_dirty: bool | None = None
    if args and args[-1] in flag_words:
        log_dirty = flag_words[args.pop()]
    elif flag_required:
        raise OSError(errno.EINVAL, f"{action} ends with one of {', '.join(flag_words)}")
    if len(args) != count:
        raise OSError(errno.EINVAL, f"{action} takes {count} numbers")
    slot, gpa, size = [*map(_number, args), None, None][:3]
    return {"action": action, "slot": slot, "gpa": gpa, "size": size, "log_dirty": log_dirty}


def memslots_file(backend: Backend, vm: str) -> RequestFile:
    """vm<N>/memslots (0644): the table of slots; a line written changes one slot."""
    def render(snap: Snapshot) -> bytes:
        one = snap.vm(vm)
        return one.memslots.encode() if one else b""

    def parse(data: bytes) -> dict[str, Any]:
        return {"vm": vm, **parse_memslot_line(data)}

    return RequestFile(backend, render, "memslot", parse)


def zap_all_file(backend: Backend, vm: str) -> RequestFile:
    """vm<N>/zap_all (0644): write `fast`, `slow` or `legacy` to zap every shadow page of
    the VM (docs/memslots-mmio.md); any other word fails with EINVAL here.

    Readable, unlike a debugfs trigger (0200), because it is one of the simulator's choice
    files: like vm<N>/state and vm<N>/inject, `cat` lists the words it takes ("fast slow
    legacy"), so a shell user finds them without the docs.  It keeps no state to read back;
    what a zap did shows in kvm/mmu_shadow_zapped.
    """
    return choice_file(backend, lambda snap: f"{' '.join(ZAP_KINDS)}\n".encode(), "zap_all",
                       "kind", ZAP_KINDS, {"vm": vm})
