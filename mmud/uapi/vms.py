"""The `vms` file's language: VM names, sizes, the command lines it takes and the lines it shows.

Neutral ground (no numpy, no simulation): the CLI parses `--mem` with `mem_size`, and the
FUSE process parses a `vms` write with `parse_vms_line`, refusing a bad line with EINVAL
before anything reaches the simulation (docs/control-files.md §10.4).  Whether the command
can be done (a name in use: EEXIST, no such VM: ENOENT, vm0: EPERM) is the simulation's call.

    create NAME [mem=SIZE] [vcpus=N] [seed=N] [workload=NAME]
    destroy NAME
"""

from __future__ import annotations

import errno
import re
from typing import Any

from mmud.uapi.params import ParamError, kstrtoull

# In MiB; a bare number is MiB, as QEMU's -m takes it.
SIZE_UNITS = {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}
_SIZE = re.compile(r"([0-9]+)\s*([MGT]?)(?:i?B)?", re.IGNORECASE)

# What `workload=` takes: mmud.guest.WORKLOADS and mmud.host.HOST_WORKLOADS (the FUSE process
# does not import them; tests/test_sim_lifecycle.py checks the two lists agree), or `none`.
WORKLOADS = ("kernel", "stream", "memslot_churn")
NO_WORKLOAD = "none"

# KVM_MAX_VCPUS of x86 Linux v5.16: KVM_CREATE_VCPU refuses more with EINVAL.
KVM_MAX_VCPUS = 1024

# `vm` and a decimal number without leading zeros, up to six digits: vm0, vm1, … vm999999.
VM_NAME = re.compile(r"vm(?:0|[1-9][0-9]{0,5})")

CREATE_KEYS = ("mem", "vcpus", "seed", "workload")


def mem_size(text: str) -> int:
    """'64M', '1G', '512' -> MiB, like QEMU's -m; ValueError for anything else or 0."""
    m = _SIZE.fullmatch(text.strip())
    if not m or int(m[1]) == 0:
        raise ValueError(f"invalid size {text!r} (e.g. 64M, 1G)")
    return int(m[1]) * SIZE_UNITS[m[2].upper()]


def is_vm_name(name: str) -> bool:
    return VM_NAME.fullmatch(name) is not None


def _refuse(message: str) -> OSError:
    return OSError(errno.EINVAL, message)


def _name(word: str) -> str:
    if not is_vm_name(word):
        raise _refuse(f"{word!r} is not a VM name (vm0 … vm999999)")
    return word


def _decimal(key: str, value: str) -> int:
    try:
        return kstrtoull(value, 10)
    except ParamError:
        raise _refuse(f"{key}={value!r}: expected a decimal number below 2^64") from None


def _create_arg(key: str, value: str) -> tuple[str, Any]:
    """One `key=value` of a create line -> the request argument."""
    if key == "mem":
        try:
            return "mem_mb", mem_size(value)
        except ValueError as e:
            raise _refuse(str(e)) from None
    if key == "vcpus":
        vcpus = _decimal(key, value)
        if not 1 <= vcpus <= KVM_MAX_VCPUS:
            raise _refuse(f"vcpus={value}: between 1 and {KVM_MAX_VCPUS}")
        return "vcpus", vcpus
    if key == "seed":
        return "seed", _decimal(key, value)
    if value not in (*WORKLOADS, NO_WORKLOAD):
        raise _refuse(f"workload={value!r}: one of {', '.join((*WORKLOADS, NO_WORKLOAD))}")
    return "workload", value


def parse_vms_line(data: bytes) -> tuple[str, dict[str, Any]]:
    """One `vms` write -> (request op, its arguments); OSError(EINVAL) for a bad line.

    One line with at most one trailing newline, words separated by single spaces, as
    vm<N>/memslots takes them.  A create line sends only the keys it gives (the simulation
    fills the rest from the daemon's command line): `mem_mb`, `vcpus`, `seed`, `workload`
    (`none` for an idle guest).
    """
    text = data.decode("latin-1")
    line = text[:-1] if text.endswith("\n") else text
    words = line.split(" ")
    command, args = words[0], words[1:]
    if "\n" in line or "\0" in line or command not in ("create", "destroy"):
        raise _refuse("expected `create NAME [key=value]…` or `destroy NAME`")
    if not args:
        raise _refuse(f"{command} takes a VM name")
    name = _name(args[0])
    if command == "destroy":
        if len(args) != 1:
            raise _refuse("destroy takes one VM name")
        return "destroy", {"name": name}
    out: dict[str, Any] = {"name": name}
    seen: set[str] = set()
    for word in args[1:]:
        key, eq, value = word.partition("=")
        if not eq or key not in CREATE_KEYS or key in seen or not value:
            raise _refuse(f"{word!r}: expected one each of {', '.join(k + '=' for k in CREATE_KEYS)}")
        seen.add(key)
        arg, parsed = _create_arg(key, value)
        out[arg] = parsed
    return "create", out


def render_mem(mem_mb: int) -> str:
    """A size as `mem=` takes it, in the largest of T, G and M that gives a whole number:
    1T, not 1048576M."""
    for unit in ("T", "G"):
        if mem_mb % SIZE_UNITS[unit] == 0:
            return f"{mem_mb // SIZE_UNITS[unit]}{unit}"
    return f"{mem_mb}M"


def render_vm_line(name: str, state: str, mem_mb: int, vcpus: int, seed: int,
                   workload: str | None) -> str:
    """One line of `vms`: the name, the state, then the VM's configuration as `create` takes it."""
    return (f"{name} {state} mem={render_mem(mem_mb)} vcpus={vcpus} seed={seed} "
            f"workload={workload or NO_WORKLOAD}\n")
