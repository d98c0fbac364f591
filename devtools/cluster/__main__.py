"""`python -m devtools.cluster up|down|status`: the detached dev cluster (the Makefile's
`cluster-up` / `cluster-down`, and what `make demo` leaves running).

    python -m devtools.cluster up       # start detached, print the kubeconfig path
    python -m devtools.cluster up --nodes 2   # with a second real node (pods on two nodes)
    python -m devtools.cluster down     # stop what `up` started
    python -m devtools.cluster status   # each process up or DEAD; exit 1 when down
    python -m devtools.cluster down-before-tests   # hack/run-tests.sh: stop it, saying so
"""

from __future__ import annotations

import argparse
import sys

from devtools.cluster import control_plane
from devtools.cluster.detached import cmd_down, cmd_down_before_tests, cmd_status, cmd_up
from devtools.cluster.waiting import ClusterError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.cluster",
        description=f"{__doc__}\n{control_plane.__doc__}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down", "status", "down-before-tests"])
    node = parser.add_mutually_exclusive_group()
    node.add_argument(
        "--real-node",
        dest="real_node",
        action="store_true",
        default=None,
        help="start the real worker node (fail if this machine cannot)",
    )
    node.add_argument(
        "--no-real-node",
        dest="real_node",
        action="store_false",
        help="only the control plane and the kwok nodes",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="real worker nodes (up; implies --real-node when above 1): the first on the "
        "host's bridge, each further one in a network namespace of its own",
    )
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    if args.nodes > 1 and args.real_node is False:
        parser.error("--nodes above 1 needs the real node")
    real_node = True if args.nodes > 1 else args.real_node
    commands = {
        "up": lambda: cmd_up(real_node, args.nodes),
        "down": cmd_down,
        "status": cmd_status,
        "down-before-tests": cmd_down_before_tests,
    }
    try:
        return commands[args.command]()
    except ClusterError as err:
        print(f"devtools.cluster: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("devtools.cluster: interrupted; stopped what was started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
