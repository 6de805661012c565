"""Helpers for tests against a real mount: a `python -m mmud run` process and shell clients."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mmud.daemon.mountpoint import is_mounted

REPO = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 60.0  # a cold start imports numpy and builds the VM


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Daemon:
    """One `python -m mmud run` process, its mount point and its captured output."""

    def __init__(self, mount: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.mount = mount
        self.log_path = mount.parent / f"{mount.name}.log"
        self.args = ["--mount", str(mount), *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Daemon:
        """Start; with `wait`, return once this run has logged its `mounted` event.

        The log, not /proc/self/mounts, decides: a stale mount from a killed run is listed
        there too.
        """
        mounted_before = self.mounted_count()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mmud", "run", *self.args],
                                         stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=REPO)
        if wait:
            wait_for(lambda: self.mounted_count() > mounted_before or self.proc.poll() is not None,
                     MOUNT_TIMEOUT, "the mount")
            assert is_mounted(self.mount), self.log()
        return self

    def mounted_count(self) -> int:
        return self.log().count('"event": "mounted"') if self.log_path.exists() else 0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def path(self, rel: str) -> Path:
        return self.mount / rel

    def read(self, rel: str) -> str:
        return cat(self.path(rel))

    def per_vm_dir(self) -> str:
        """The one kvm/<pid>-<fd> directory."""
        (name,) = [n for n in os.listdir(self.path("kvm")) if re.fullmatch(r"\d+-\d+", n)]
        return name

    def sim_pid(self, vm: str = "vm0") -> int:
        """The simulation process: the `pid:` line of vm<N>/status."""
        return int(status_fields(self.read(f"{vm}/status"))["pid"])

    def events(self, name: str) -> list[dict]:
        """The JSON log events called `name` (journald's `<N>` prefix stripped)."""
        out = []
        for line in self.log().splitlines():
            if (m := re.match(r"<\d>(\{.*\})$", line)) is not None:
                event = json.loads(m[1])
                if event.get("event") == name:
                    out.append(event)
        return out


def serving(mount: Path, *args: str) -> Iterator[Daemon]:
    """A test module's daemon: `yield from serving(mount, *args)` in a fixture. At the end it
    must stop on SIGTERM with exit 0 and leave no mount behind."""
    d = Daemon(mount, *args).start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        assert d.stop() == 0, d.log()
    assert not is_mounted(d.mount)


def status_fields(text: str) -> dict[str, str]:
    """vm<N>/status as a dict: `key: value` lines, values stripped."""
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def cat(path: Path | str) -> str:
    done = subprocess.run(["cat", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def shell_write(path: Path | str, text: str,
                user: str | None = None) -> subprocess.CompletedProcess:
    """Exactly one write(2) of `text`, by a shell pipeline, optionally as `user`.

    A shell's own printf/echo may split its output at newlines into several writes, so
    `dd iflag=fullblock count=1` collects the bytes and writes them in one call.
    """
    cmd = ["sh", "-c", 'printf "%s" "$1" | dd of="$2" bs="$3" count=1 iflag=fullblock status=none',
           "sh", text, str(path), str(len(text.encode()))]
    if user:
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def echo(path: Path | str, word: str) -> subprocess.CompletedProcess:
    """`echo word > path`, the way people write control files."""
    return subprocess.run(["sh", "-c", f'echo {word} > "$0"', str(path)],
                          capture_output=True, text=True, check=False)


def assert_refused(done: subprocess.CompletedProcess, message: str = "Invalid argument") -> None:
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert message in done.stderr, done.stderr
