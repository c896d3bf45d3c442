"""`localaistack hardware detect|show`: print (and save) the machine's HardwareSnapshot."""

from __future__ import annotations

import argparse

from smartrun import hardware
from smartrun.argv import positive_seconds


def register(subparsers) -> None:
    """Add the `hardware` group with `detect` and `show`."""
    group = subparsers.add_parser(
        "hardware", help="detect the GPUs or show a saved snapshot", allow_abbrev=False
    )
    commands = group.add_subparsers(dest="command", metavar="{detect,show}")
    commands.required = True

    detect = commands.add_parser(
        "detect", help="read the GPUs through NVML and print a summary", allow_abbrev=False,
        description="Read the GPUs through NVML. With --ray-address, read every GPU node of a Ray cluster "
        "(a small Ray task runs NVML on each node; needs the optional extra: pip install 'smartrun[ray]').",
    )
    detect.add_argument("--ray-address", metavar="ADDR",
                        help="a running Ray cluster (HOST:PORT of its head): one snapshot per GPU node, head first")
    detect.add_argument("--timeout", type=positive_seconds, default=120.0, metavar="S",
                        help="seconds to wait for the NVML task on every node (default 120)")
    detect.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    detect.add_argument("--save", metavar="FILE", help="also write the snapshot to FILE (atomically)")
    detect.set_defaults(func=detect_command)

    show = commands.add_parser("show", help="print a saved hardware snapshot", allow_abbrev=False)
    show.add_argument(
        "snapshot", metavar="SNAPSHOT.json", nargs="+",
        help="a snapshot file written by `hardware detect --save`; several (one per node, head first) show a cluster"
    )
    show.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    show.set_defaults(func=show_command)


def detect_command(args: argparse.Namespace) -> int:
    if args.ray_address:
        from smartrun import ray_cluster

        snapshot = ray_cluster.detect_cluster(args.ray_address, timeout=args.timeout)
    else:
        snapshot = hardware.detect()
    if args.save:
        hardware.save_snapshot(snapshot, args.save)
    _print(snapshot, args.json)
    if args.save and not args.json:
        print(f"saved to {args.save}")
    return 0


def show_command(args: argparse.Namespace) -> int:
    from smartrun import cluster

    _print(cluster.combine([hardware.load_snapshot(path) for path in args.snapshot]), args.json)
    return 0


def _print(snapshot, as_json: bool) -> None:
    from smartrun import cluster

    print(snapshot.model_dump_json(indent=2) if as_json else cluster.summary(snapshot))
