"""The run-control language: what `vm<N>/state` and `vm<N>/break` take and what `break` shows.

Neutral ground (no numpy, no simulation): the FUSE process parses a write with these
functions and refuses a bad one with EINVAL before anything reaches the simulation
(docs/control-files.md §10.3).  Numbers are read as the kernel reads an unsigned decimal,
`kstrtoull(…, 10)`: one optional `+`, digits, at most one trailing `\\n`.

    vm<N>/state   run | pause | restart | destroy | step N
    vm<N>/break   audit_error | guest_crash | step=N | none
"""

from __future__ import annotations

import errno
from typing import Any

from mmud.uapi.params import ParamError, kstrtoull

STATE_ACTIONS = ("run", "pause", "restart", "destroy")  # destroy: any VM but vm0 (EPERM)
STEP = "step"  # `step N` in state, `step=N` in break

AUDIT_ERROR = "audit_error"  # a step in which the VM's audit reports an error
GUEST_CRASH = "guest_crash"  # the step in which the VM's guest (or its simulated KVM) raises
NO_BREAK = "none"
BREAK_WORDS = (AUDIT_ERROR, GUEST_CRASH, NO_BREAK)


def _refuse(message: str) -> OSError:
    return OSError(errno.EINVAL, message)


def _count(text: str, what: str) -> int:
    """A step count above 0 (0 would run nothing, or break nowhere): EINVAL otherwise."""
    try:
        n = kstrtoull(text, 10)
    except ParamError:
        n = 0
    if n == 0:
        raise _refuse(f"{what}: expected a decimal number from 1 to 2^64-1")
    return n


def _word(data: bytes) -> tuple[str, str]:
    """The write as text, and as a word: without its one optional trailing newline."""
    text = data.decode("latin-1")
    return text, text[:-1] if text.endswith("\n") else text


def parse_state(data: bytes) -> dict[str, Any]:
    """One `vm<N>/state` write -> the request's arguments: `action`, and `steps` for a step.

    The words are a choice file's (one word, at most one trailing newline); `step N` is the
    word, one space and N (the newline then belongs to N, as kstrtoull takes it)."""
    text, word = _word(data)
    if word in STATE_ACTIONS:
        return {"action": word}
    if text.startswith(STEP + " "):
        return {"action": STEP, "steps": _count(text[len(STEP) + 1:], "step N")}
    raise _refuse(f"expected one of {', '.join(STATE_ACTIONS)} or `step N`")


def parse_break(data: bytes) -> dict[str, Any]:
    """One `vm<N>/break` write -> the request's arguments: `kind`, and `step` for `step=N`."""
    text, word = _word(data)
    if word in BREAK_WORDS:
        return {"kind": word}
    if text.startswith(STEP + "="):
        return {"kind": STEP, "step": _count(text[len(STEP) + 1:], "step=N")}
    raise _refuse(f"expected one of {', '.join(BREAK_WORDS)} or `step=N`")


def render_break(kind: str, step: int | None = None) -> str:
    """A break condition as `vm<N>/break` takes it: `step=N`, or the word."""
    return f"{STEP}={step}" if kind == STEP else kind
