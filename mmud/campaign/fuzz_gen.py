"""Random operation sequences for the fuzzer's guest (mmud/campaign/fuzz_guest.py).

Every choice comes from one `random.Random`, and the generator never looks at the VM: the
same seed gives the same sequence whatever the MMU does with it. The mix leans on what finds
MMU bugs — accesses to the addresses just mapped or changed (faults, unsync pages, dirty
pages), table edits of live address spaces (write protection, emulation, write flooding),
CR3 loads (syncs) — and keeps the rarer operations (zaps, memslot changes, dirty-log
collections, paging-mode flips) frequent enough that each runs many times in a few thousand.
"""

from __future__ import annotations

import random
from collections import deque

from mmud.campaign.fuzz_guest import (
    DIRTY_MODES,
    FLIPS,
    FRAMES_2M,
    FRAMES_4K,
    KINDS,
    SLOT0_FRAMES,
    SLOT_ACTIONS,
    SLOT_GPAS,
    SLOT_IDS,
    SPACES,
    VAS,
    Op,
)
from mmud.campaign.reference import NX, PS, A, D, P, U, W
from mmud.kvm.mmu.zap import ZAP_KINDS

RSVD = 1 << 50  # above MAXPHYADDR 46: reserved at every level

# (operation, weight)
MIX = (
    ("access", 60),
    ("map", 8),
    ("perm", 8),
    ("unmap", 3),
    ("cr3", 4),
    ("invlpg", 2),
    ("flip", 1),
    ("harvest", 4),
    ("slot", 3),
    ("dirty_mode", 1),
    ("zap", 1),
)
_NAMES = tuple(name for name, _ in MIX)
_WEIGHTS = tuple(weight for _, weight in MIX)
WRITE_KINDS = tuple(k for k, (write, _, _) in enumerate(KINDS) if write)
SUPERVISOR_WRITE, USER_WRITE = WRITE_KINDS


class Generator:
    """Draws operations one at a time; remembers the addresses it touched lately."""

    def __init__(self, seed: int, vcpus: int) -> None:
        self.rng = random.Random(f"fuzz/{seed}/{vcpus}")
        self.vcpus = vcpus
        self.recent: deque[int] = deque(maxlen=6)

    def ops(self, n: int) -> list[Op]:
        """n operations: first a few maps made before the guest runs, then the mix."""
        rng = self.rng
        setup = min(n, rng.randrange(8))
        out = [self.op("map") for _ in range(setup)]
        while len(out) < n:
            name = rng.choices(_NAMES, _WEIGHTS)[0]
            out += self.dirty_burst() if name == "harvest" and rng.random() < 0.5 else [self.op(name)]
        return out[:n]

    def dirty_burst(self) -> list[Op]:
        """Map a page of slot 0 in every address space, log slot 0, write the page, collect
        the log (the page is clean and write-protected again), then collect while vCPUs
        write it — a write between the collection's steps for the page's bitmap word is
        what the ordering of a collection has to survive — and again."""
        rng = self.rng
        v = self.recent[-1] if self.recent and rng.random() < 0.5 else self.va()
        self.recent.append(v)
        frame = FRAMES_4K.index(rng.choice(SLOT0_FRAMES))
        flags = P | W | U | A
        burst: list[Op] = [["map", rng.randrange(self.vcpus), space, v, 1, frame, flags]
                           for space in range(SPACES)]
        kind = SUPERVISOR_WRITE if rng.random() < 0.75 else USER_WRITE
        burst += [["slot", 0, "log", 0], ["access", rng.randrange(self.vcpus), v, kind]]
        for _ in range(rng.randrange(1, 4)):
            writes = [[rng.randrange(self.vcpus), v, kind] for _ in range(rng.randrange(1, 4))]
            burst += [["harvest", 0, []], ["harvest", 0, writes]]
        return burst

    def va(self) -> int:
        rng = self.rng
        if self.recent and rng.random() < 0.75:
            return rng.choice(self.recent)
        return rng.randrange(len(VAS))

    def op(self, name: str) -> Op:
        rng = self.rng
        cpu = rng.randrange(self.vcpus)
        if name == "access":
            return ["access", cpu, self.va(), rng.randrange(len(KINDS))]
        if name == "map":
            v = self.va() if rng.random() < 0.3 else rng.randrange(len(VAS))
            self.recent.append(v)
            level = 2 if rng.random() < 0.2 else 1
            frames = FRAMES_4K if level == 1 else FRAMES_2M
            flags = P | W * (rng.random() < 0.7) | U * (rng.random() < 0.75)
            flags |= NX * (rng.random() < 0.2) | A * (rng.random() < 0.3) | D * (rng.random() < 0.2)
            return ["map", cpu, rng.randrange(SPACES), v, level, rng.randrange(len(frames)), flags]
        if name == "perm":
            v = self.va()
            self.recent.append(v)
            level = rng.choices((1, 2, 3, 4), (45, 25, 18, 12))[0]
            flip = rng.choices((W, U, NX, A | D, P, RSVD, PS), (30, 30, 15, 8, 10, 3, 2))[0]
            return ["perm", cpu, rng.randrange(SPACES), v, level, flip]
        if name == "unmap":
            level = rng.choices((1, 2, 3, 4), (55, 25, 15, 5))[0]
            return ["unmap", cpu, rng.randrange(SPACES), self.va(), level]
        if name == "cr3":
            return ["cr3", cpu, rng.randrange(SPACES)]
        if name == "invlpg":
            return ["invlpg", cpu, self.va()]
        if name == "flip":
            return ["flip", cpu, rng.choice(tuple(FLIPS))]
        if name == "harvest":
            accesses = []
            if rng.random() < 0.5:
                accesses = [[rng.randrange(self.vcpus), self.va(),
                             rng.choice(WRITE_KINDS) if rng.random() < 0.7 else rng.randrange(len(KINDS))]
                            for _ in range(rng.randrange(1, 7))]
            return ["harvest", rng.randrange(3), accesses]
        if name == "slot":
            sid = 0 if rng.random() < 0.4 else rng.choice(SLOT_IDS)
            return ["slot", sid, rng.choices(SLOT_ACTIONS, (3, 3, 1, 3, 2))[0], rng.randrange(len(SLOT_GPAS))]
        if name == "dirty_mode":
            return ["dirty_mode", rng.randrange(len(DIRTY_MODES))]
        if name == "zap":
            return ["zap", rng.choice(ZAP_KINDS)]
        raise ValueError(f"unknown operation {name!r}")
