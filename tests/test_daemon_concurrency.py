"""Many clients at once: eight threads reading and writing for ten seconds without an error."""

import random
import threading
import time

from mmud.uapi.stats import STATS
from tests.fusemount import cat, echo, shell_write

DURATION_SECONDS = 10.0
THREADS = 8


def test_eight_threads_for_ten_seconds(daemon):
    errors: list[str] = []
    readable = [f"parameters/{n}" for n in ("mmu_audit", "mmu_audit_ratelimit_ms", "mmio_caching")]
    readable += [f"kvm/{s.name}" for s in STATS] + ["kvm/mmu-debug", "vm0/status", "vm0/state"]
    stop = time.monotonic() + DURATION_SECONDS

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < stop:
                rel = rng.choice(readable)
                with open(daemon.path(rel), "rb") as f:
                    if not f.read().endswith(b"\n"):
                        errors.append(f"{rel}: truncated")
                if seed % 2:
                    path = daemon.path(rng.choice(["parameters/mmu_audit", "kvm/mmu-debug"]))
                    with open(path, "wb", buffering=0) as f:
                        f.write(rng.choice([b"0\n", b"1\n"]))
                    with open(daemon.path("parameters/mmu_audit_ratelimit_burst"), "wb",
                              buffering=0) as f:
                        f.write(b"%d" % rng.randrange(100))
        except OSError as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert echo(daemon.path("parameters/mmu_audit"), "0").returncode == 0
    assert cat(daemon.path("parameters/mmu_audit")) == "N\n"
    assert shell_write(daemon.path("parameters/mmu_audit_ratelimit_burst"), "10").returncode == 0


def test_unprivileged_user_reads_but_cannot_write(daemon):
    """allow_other lets everyone read; default_permissions keeps writes to root, as on sysfs."""
    import subprocess

    done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           "cat", str(daemon.path("parameters/mmu_audit"))],
                          capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout) == (0, "N\n"), done.stderr
    refused = shell_write(daemon.path("parameters/mmu_audit"), "1", user="nobody")
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    assert cat(daemon.path("parameters/mmu_audit")) == "N\n"
