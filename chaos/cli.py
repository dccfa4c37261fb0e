"""``python -m chaos``: the same verbs for every backend.

    python -m chaos up 6 --shards 2 --backend netns
    python -m chaos partition 1,2 / 3,4,5,6
    python -m chaos heal
    python -m chaos kill 3 && python -m chaos restart 3
    python -m chaos delay 2 200
    python -m chaos down

State is kept in ``.chaos/<prefix>/`` so each verb can be a separate invocation.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from chaos.cluster import BACKENDS, DEFAULT_PREFIX, Cluster, default_state_dir
from chaos.util import ChaosError


def parse_groups(words: list[str]) -> list[list[int]]:
    """``["1,2", "/", "3"]`` or ``["1,2/3"]`` -> ``[[1, 2], [3]]``."""
    text = " ".join(words).replace(" ", "")
    groups: list[list[int]] = []
    for part in text.split("/"):
        if not part:
            raise ChaosError("empty group in partition (write e.g. `partition 1,2 / 3`)")
        try:
            groups.append([int(x) for x in part.split(",") if x])
        except ValueError as exc:
            raise ChaosError(f"node ids are integers: {part!r}") from exc
    return groups


def parse_env(pairs: list[str]) -> dict[str, str]:
    """``["KV_X=1"]`` -> ``{"KV_X": "1"}``."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ChaosError(f"--env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the README's help text)."""
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--prefix", default=DEFAULT_PREFIX,
                        help="name prefix of everything created (default: %(default)s)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where state and logs live (default: .chaos/ in the repo)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    up = sub.add_parser("up", help="start N nodes, send the view, wait until all answer")
    up.add_argument("n", type=int)
    up.add_argument("--shards", type=int, default=1)
    up.add_argument("--backend", choices=BACKENDS, default="netns")
    up.add_argument("--subnet", help="netns/podman: private subnet to use (only ours)")
    up.add_argument("--base-port", type=int, help="local: port of node 1 (default 8081)")
    up.add_argument("--image", help="podman: image to run (default: build from Containerfile)")
    up.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for every node (e.g. KV_RETRY_INTERVAL=0.1)")
    up.add_argument("--node-cmd", help="command that runs a node (default: python -m trio_kv)")
    up.add_argument("--no-secret", action="store_true",
                    help="start bare nodes (default: a random KV_CLUSTER_SECRET for all)")
    up.add_argument("--no-view", action="store_true", help="do not send the view")
    up.add_argument("--foreground", action="store_true",
                    help="stay attached; Ctrl-C tears the cluster down")

    sub.add_parser("down", help="stop everything and remove all that was created")
    sub.add_parser("status", help="nodes, addresses, shards and current faults")
    part = sub.add_parser("partition", help="cut the network between groups: 1,2 / 3")
    part.add_argument("groups", nargs="+")
    part.add_argument("--oneway", action="store_true",
                      help="only drop packets from the first group(s) to the later ones")
    iso = sub.add_parser("isolate", help="cut one node off from all others")
    iso.add_argument("node", type=int)
    sub.add_parser("heal", help="remove every cut and delay")
    kill = sub.add_parser("kill", help="SIGKILL a node")
    kill.add_argument("node", type=int)
    restart = sub.add_parser("restart", help="start a node again and resend it the view")
    restart.add_argument("node", type=int)
    delay = sub.add_parser("delay", help="add latency to everything a node sends (0 removes)")
    delay.add_argument("node", type=int)
    delay.add_argument("ms", type=float)
    sub.add_parser("view", help="send the view to every node again")
    sub.add_parser("urls", help="print the nodes' base URLs, one per line")
    rules = sub.add_parser("rules", help="print a node's iptables filter table")
    rules.add_argument("node", type=int)
    logs = sub.add_parser("logs", help="print the end of a node's log")
    logs.add_argument("node", type=int)
    logs.add_argument("--lines", type=int, default=40)
    image = sub.add_parser("image", help="podman: build the base image and the node image")
    image.add_argument("--rebuild-base", action="store_true")
    return parser


def up_env(args: argparse.Namespace) -> dict[str, str]:
    """``--env`` settings; ``--no-secret`` clears the cluster secret ``up`` would generate."""
    env = parse_env(args.env)
    if args.no_secret:
        env["KV_CLUSTER_SECRET"] = ""
    return env


def _sigterm(_sig: int, _frame: object) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run one verb; errors print one line (no traceback) and exit 1."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    state_dir = args.state_dir or default_state_dir()
    try:
        return _dispatch(args, state_dir)
    except ChaosError as exc:
        print(f"chaos: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("chaos: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        return 0


def _dispatch(args: argparse.Namespace, state_dir: Path) -> int:
    if args.verb == "up":
        node_cmd = None
        if args.node_cmd:
            import shlex
            node_cmd = shlex.split(args.node_cmd)
        cluster = Cluster.up(args.n, args.shards, backend=args.backend, prefix=args.prefix,
                             state_dir=state_dir, env=up_env(args), node_cmd=node_cmd,
                             send_view=not args.no_view, subnet=args.subnet,
                             base_port=args.base_port, image=args.image)
        print(cluster.describe())
        print("view:", json.dumps(cluster.state.view()))
        if args.foreground:
            try:
                print("Ctrl-C to stop the cluster", flush=True)
                while True:
                    time.sleep(3600)
            finally:
                cluster.down()
                print("cluster removed")
        return 0
    if args.verb == "image":
        from chaos.image import ensure_images
        print(ensure_images(rebuild_base=args.rebuild_base))
        return 0
    if args.verb == "down":
        try:
            cluster = Cluster.attach(args.prefix, state_dir)
        except ChaosError:
            from chaos.cluster import _down_stale
            for backend in ("netns", "podman", "local"):
                from contextlib import suppress
                with suppress(ChaosError):
                    _down_stale(state_dir, args.prefix, backend)
            print("nothing was up; removed any leftovers")
            return 0
        cluster.down()
        print("cluster removed")
        return 0

    cluster = Cluster.attach(args.prefix, state_dir)
    if args.verb == "status":
        print(cluster.describe())
    elif args.verb == "urls":
        print("\n".join(n.url for n in cluster.nodes))
    elif args.verb == "partition":
        cluster.partition(*parse_groups(args.groups), oneway=args.oneway)
        print(cluster.describe())
    elif args.verb == "isolate":
        cluster.isolate(args.node)
        print(cluster.describe())
    elif args.verb == "heal":
        cluster.heal()
        print(cluster.describe())
    elif args.verb == "kill":
        cluster.kill(args.node)
        print(f"node {args.node} killed (SIGKILL)")
    elif args.verb == "restart":
        cluster.restart(args.node)
        print(f"node {args.node} restarted and sent the view")
    elif args.verb == "delay":
        cluster.delay(args.node, args.ms)
        print(cluster.describe())
    elif args.verb == "view":
        cluster.send_view()
        print("view sent to every node")
    elif args.verb == "rules":
        from chaos.netbase import NetworkBackend
        if not isinstance(cluster.backend, NetworkBackend):
            raise cluster.backend.no_network("rules")
        print(cluster.backend.rules_of(cluster.node(args.node)), end="")
    elif args.verb == "logs":
        print(cluster.backend.log_tail(cluster.node(args.node)))
    return 0
