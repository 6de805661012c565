"""Shared fixtures: a real `python -m mmud run` daemon on a real FUSE mount.

Mount points live in a 0755 directory under /tmp (not pytest's 0700 tmp_path) so that an
unprivileged user can reach them.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from mmud.daemon.mountpoint import is_mounted
from tests.fusemount import Daemon, serving


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A traversable scratch directory for mount points, removed (with any mount) at the end."""
    base = Path(tempfile.mkdtemp(prefix="mmud-test-"))
    base.chmod(0o755)
    yield base
    for child in base.iterdir():
        if is_mounted(child):
            subprocess.run(["fusermount", "-u", "-z", str(child)], check=False)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(workdir: Path) -> Iterator[Daemon]:
    """A daemon shared by a test module; stopped with SIGTERM, which must unmount it."""
    yield from serving(workdir / "mnt")


@pytest.fixture(autouse=True)
def _structlog_config() -> Iterator[None]:
    """Every test starts with the structlog configuration the previous one found: a test
    that runs a command in-process (`cli.main`, which configures logging for its process)
    must not change what a later test's capture_logs sees."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
