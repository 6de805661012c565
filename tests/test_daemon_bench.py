"""The daemon benchmark runs and prints its figures (their values are not judged here)."""

import subprocess
import sys

from tests.fusemount import REPO

FIGURES = ("param_read_p99_ms_idle", "param_read_p99_ms_running", "toggle_to_effect_ms")


def test_bench_daemon_quick():
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "daemon"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in FIGURES:
        assert any(line.startswith(f"{name} = ") and line.endswith(" ms")
                   for line in done.stdout.splitlines()), done.stdout
