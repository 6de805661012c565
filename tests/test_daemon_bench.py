"""The daemon benchmark runs and prints its figures (their values are not judged here)."""

import subprocess
import sys

from tests.fusemount import REPO

FIGURES = ("param_read_p99_ms_idle", "param_read_p99_ms_running", "toggle_to_effect_ms",
           "toggle_to_effect_p99_ms[audit_full_256M]")  # a quick run's guest; 4G in full


def test_bench_daemon_quick():
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "daemon"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in FIGURES:
        assert any(line.startswith(f"{name} = ") and line.endswith(" ms")
                   for line in done.stdout.splitlines()), done.stdout


SOAK_FIGURES = ("soak_ops", "soak_errors_unexpected", "soak_hangs_over_1s",
                "soak_rss_growth_mb[main]", "soak_rss_growth_mb[sim]")


def test_bench_soak_quick():
    """The soak runs its eight clients against a real daemon and prints its figures."""
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "soak"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in SOAK_FIGURES:
        assert any(line.startswith(f"{name} = ") for line in done.stdout.splitlines()), done.stdout
