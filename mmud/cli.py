"""`mmud run …`: parse arguments, set up logging, run the daemon until it is stopped.

A user error (bad argument, bad parameter, unusable mount point, a VM configuration the
simulation refuses) prints one `mmud: …` line and exits with status 2, never a traceback.
Any other exception in the main process — say, a mount point removed while the simulation
was starting, so that libfuse cannot mount — is logged as one `daemon_failed` event (with
the traceback) and exits with status 1, so that systemd's `Restart=on-failure` applies.
A stop by signal or unmount exits 0, whatever happened to the simulation meanwhile.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
from collections.abc import Callable
from pathlib import Path

import structlog

from mmud.campaign import cli as campaign_cli
from mmud.daemon import replay, service
from mmud.daemon.client import SimClient, SimError
from mmud.daemon.mountpoint import MountPointError
from mmud.daemon.protocol import SimConfig, VmConfig
from mmud.fs import fuse
from mmud.fs.tree import Tree
from mmud.uapi.params import ParamError, Params
from mmud.uapi import vms
from mmud.log import LEVELS, setup_logging

EXIT_FAILURE = 1
EXIT_USAGE = 2


def mem_size(text: str) -> int:
    """'64M', '1G', '512' -> MiB, like QEMU's -m (the parser is mmud.uapi.vms's, shared with
    the `vms` file)."""
    try:
        return vms.mem_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def load_param(text: str) -> tuple[str, str | None]:
    """NAME=VALUE as modprobe takes it; a bare NAME is 'no value' (true for a bool)."""
    name, eq, value = text.partition("=")
    return name, value if eq else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmud", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the simulation and serve the control files")
    run.add_argument("--mount", type=Path, default=Path("mountpoint"),
                     help="mount point (default: ./mountpoint, created if missing)")
    run.add_argument("--param", type=load_param, action="append", default=[],
                     metavar="NAME=VALUE", help="kvm module parameter at load time (repeatable)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--mem", type=mem_size, default=64, metavar="SIZE",
                     help="guest memory, e.g. 64M or 1G (default 64M)")
    run.add_argument("--vcpus", type=int, default=1)
    run.add_argument("--workload", default="kernel",
                     help="guest workload, or none for an idle guest (default: kernel)")
    run.add_argument("--state-dir", type=Path, default=None,
                     help="directory for persisted state (created if missing)")
    run.add_argument("--log-level", choices=LEVELS, default="info")
    rp = sub.add_parser("replay", help="replay a run's recording and compare it (docs/replay.md)")
    rp.add_argument("file", type=Path, help="<state-dir>/recordings/<start>.jsonl")
    rp.add_argument("--until", type=int, metavar="STEP", help="stop at this step of the first VM")
    rp.add_argument("--mount", type=Path, metavar="DIR",
                    help="serve the replayed VMs' control files on DIR, paused at the stop")
    rp.add_argument("--trace", metavar="EVENTS", help="print these trace events (kvmmmu:*)")
    rp.add_argument("--audit", action="store_true", help="audit at every point")
    rp.add_argument("--log-level", choices=LEVELS, default="critical",
                    help="the replayed run's own events (default: only the report)")
    campaign_cli.add_parser(sub)
    return p


def run(args: argparse.Namespace) -> int:
    load = dict(args.param)
    params = Params(load)  # refuse bad load-time values before anything starts
    if args.state_dir:
        args.state_dir.mkdir(parents=True, exist_ok=True)
    config = SimConfig(vms=(VmConfig(mem_mb=args.mem, vcpus=args.vcpus, seed=args.seed,
                                     workload=None if args.workload == "none" else args.workload),),
                       load=load, log_level=args.log_level,
                       state_dir=str(args.state_dir) if args.state_dir else None)
    structlog.get_logger("mmud").info("starting", mountpoint=str(args.mount), config=repr(config))
    return service.run(config, args.mount, serve_tree(params))


def serve_tree(params: Params) -> service.Serve:
    """Serve the control tree, with `params` as the parameter block the FUSE side parses."""
    def serve(client: SimClient, mountpoint: Path, ready: Callable[[], None]) -> None:
        fuse.serve(Tree(client, params), client, mountpoint, ready)

    return serve


def replay_run(args: argparse.Namespace) -> int:
    """`mmud replay FILE`: mmud.daemon.replay; `--mount` serves the replayed VMs."""
    def mount(config: SimConfig) -> int:
        return service.run(config, args.mount, serve_tree(Params(config.load)))

    return replay.command(args.file, until=args.until, audit=args.audit, trace=args.trace,
                          mount=mount if args.mount else None)


def main(argv: list[str] | None = None) -> int:
    faulthandler.enable()
    args = parser().parse_args(argv)
    if args.command == "campaign":
        return campaign_cli.main(args)
    setup_logging(args.log_level)
    try:
        return replay_run(args) if args.command == "replay" else run(args)
    except (ParamError, MountPointError, SimError) as e:
        print(f"mmud: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - logged whole; the status tells systemd it failed
        structlog.get_logger("mmud").critical("daemon_failed", error=f"{type(e).__name__}: {e}",
                                              exc_info=True)
        return EXIT_FAILURE
