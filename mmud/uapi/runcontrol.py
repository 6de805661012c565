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


def _parse(data: bytes, words: tuple[str, ...], key: str, sep: str, count_key: str,
           what: str) -> dict[str, Any]:
    """A choice file's write: one of `words` (at most one trailing newline), or `step` and
    `sep` and N (the newline then belongs to N, as kstrtoull takes it)."""
    text, word = _word(data)
    if word in words:
        return {key: word}
    if text.startswith(STEP + sep):
        return {key: STEP, count_key: _count(text[len(STEP) + 1:], what)}
    raise _refuse(f"expected one of {', '.join(words)} or `{what}`")


def parse_state(data: bytes) -> dict[str, Any]:
    """One `vm<N>/state` write -> the request's arguments: `action`, and `steps` for a step."""
    return _parse(data, STATE_ACTIONS, "action", " ", "steps", "step N")


def parse_break(data: bytes) -> dict[str, Any]:
    """One `vm<N>/break` write -> the request's arguments: `kind`, and `step` for `step=N`."""
    return _parse(data, BREAK_WORDS, "kind", "=", "step", "step=N")


def render_break(kind: str, step: int | None = None) -> str:
    """A break condition as `vm<N>/break` takes it: `step=N`, or the word."""
    return f"{STEP}={step}" if kind == STEP else kind
