"""Syntax checks of tracefs writes, done on the FUSE side before a request (Linux v5.16).

`enable` files and `tracing_on`/`buffer_size_kb` take kstrtoul(…, 10): digits and one
optional newline (an `enable` file then wants 0 or 1, `buffer_size_kb` more than 0); anything
else fails with EINVAL and asks the simulation nothing. `set_event` and `filter` text is
checked against the events in the simulation (unknown names, fields: EINVAL there).
"""

from __future__ import annotations

import errno
import re
from typing import Any

_ULONG = re.compile(r"\+?([0-9]+)\n?")


def _ulong(data: bytes) -> int:
    m = _ULONG.fullmatch(data.decode("latin-1"))
    if m is None:
        raise OSError(errno.EINVAL, "expected a decimal number")
    return int(m[1])


def parse_enable(data: bytes) -> dict[str, Any]:
    """events/enable, events/<system>/enable, events/<system>/<event>/enable: 0 or 1."""
    if _ulong(data) not in (0, 1):
        raise OSError(errno.EINVAL, "expected 0 or 1")
    return {"text": data.decode("latin-1")}


def parse_number(data: bytes) -> dict[str, Any]:
    """tracing_on (any number: non-zero is on)."""
    _ulong(data)
    return {"text": data.decode("latin-1")}


def parse_buffer_size(data: bytes) -> dict[str, Any]:
    """buffer_size_kb: KiB per CPU, more than 0."""
    if not _ulong(data):
        raise OSError(errno.EINVAL, "buffer_size_kb must be positive")
    return {"text": data.decode("latin-1")}


def parse_text(data: bytes) -> dict[str, Any]:
    """set_event, filter, trace: the text as written."""
    return {"text": data.decode("latin-1")}
