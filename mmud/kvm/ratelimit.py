"""lib/ratelimit.c: the kernel's fixed-window rate limiter (`___ratelimit`).

Used by the audit (its run limiter and inspect_spte_has_rmap's report limiter) and by the
MMIO generation wrap message (kvm_debug_ratelimited). Time is the caller's clock — the VM's
simulated clock — so a rate-limited run is as reproducible as the rest.
"""

from __future__ import annotations


class Ratelimit:
    """A fixed window that starts at the first call; at most `burst` passes per window; the
    first call of a new window reports how many calls were refused."""

    def __init__(self, name: str, interval_ms: int, burst: int) -> None:
        self.name = name
        self.interval_ns = interval_ms * 1_000_000
        self.burst = burst
        self.begin: int | None = None
        self.printed = 0
        self.missed = 0

    def allow(self, now_ns: int, out: list[str]) -> bool:
        if not self.interval_ns:
            return True
        if self.begin is None:
            self.begin = now_ns
        if now_ns - self.begin >= self.interval_ns:
            if self.missed:
                out.append(f"{self.name}: {self.missed} callbacks suppressed\n")
            self.begin, self.printed, self.missed = now_ns, 0, 0
        if self.burst and self.printed < self.burst:
            self.printed += 1
            return True
        self.missed += 1
        return False
