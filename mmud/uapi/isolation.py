"""The `kvm/isolation/map` write: a symbol, or a range of kernel addresses.

Parsed in the filesystem process (a refused write fails there with EINVAL and never reaches
the simulation) and applied by mmud/kvm/isolation/addrspace.py.
"""

from __future__ import annotations

import errno
import re

KERNEL_SPACE = 0xFFFF800000000000  # the lowest address of the kernel half
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_RANGE = re.compile(r"(?:0[xX])?([0-9a-fA-F]{1,16})[ \t]+(?:0[xX])?([0-9a-fA-F]{1,16})")


class MapRequest:
    """A parsed `kvm/isolation/map` write: a symbol name, or an address and a length."""

    def __init__(self, symbol: str | None = None, start: int = 0, size: int = 0) -> None:
        self.symbol, self.start, self.size = symbol, start, size


def parse_map(data: bytes) -> MapRequest:
    """`SYMBOL` or `ADDRESS LENGTH` (hex, 0x optional), one optional trailing newline."""
    text = data.decode("latin-1")
    if text.endswith("\n"):
        text = text[:-1]
    if _SYMBOL.fullmatch(text):
        return MapRequest(symbol=text)
    m = _RANGE.fullmatch(text)
    if m is None:
        raise OSError(errno.EINVAL, "expected SYMBOL or ADDRESS LENGTH")
    start, size = int(m[1], 16), int(m[2], 16)
    if size == 0 or start < KERNEL_SPACE or start + size > 1 << 64:
        raise OSError(errno.EINVAL, "not a range of kernel addresses")
    return MapRequest(start=start, size=size)
