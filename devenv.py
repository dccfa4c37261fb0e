#!/usr/bin/env python3
"""Start a trio-kv development cluster with one command.

    python3 devenv.py -n 6 --shards 2                 # local processes, no root needed
    sudo python3 devenv.py -n 3 --backend netns       # namespaces: partitions work
    sudo python3 devenv.py -n 3 --backend podman      # containers from the Containerfile

It creates (or refreshes) ``.venv`` and installs the project into it when needed, so it runs
on a fresh clone with nothing but Python 3.11+; then it starts the nodes, sends them the view,
prints the endpoints and a curl line to paste, and tears everything down on Ctrl-C.  While it
runs, ``python -m chaos partition 1 / 2,3`` (and the other verbs) act on the same cluster from
another terminal.

Nodes are durable by default: node i keeps its data in ``.devenv-data/<prefix>-n<i>`` (kept
after Ctrl-C, so the next run comes back with its keys and view); ``--memory`` runs them in
memory only, ``--data DIR`` moves the data.

The nodes share a random cluster secret (``KV_CLUSTER_SECRET``, printed at start-up): ``PUT
/view`` and the nodes' internal endpoints need it in ``X-KV-Secret``.  ``--no-secret`` starts
bare nodes instead (anyone who reaches a port can then change the view).

Only the standard library is used until the venv exists: this file must run before anything
is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent
VENV = REPO / ".venv"
STAMP = VENV / ".devenv-stamp"
REEXEC_FLAG = "TKV_DEVENV_IN_VENV"


def venv_python() -> Path:
    """The interpreter inside ``.venv``."""
    return VENV / "bin" / "python"


def wanted_stamp() -> str:
    """What the venv was built from: the interpreter version and the dependency list."""
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    return f"{sys.version_info.major}.{sys.version_info.minor} {digest}"


def ensure_venv() -> None:
    """Create ``.venv`` and ``pip install -e .`` unless it is already up to date."""
    if sys.version_info < (3, 11):  # noqa: UP036  (devenv may be run by any python3)
        sys.exit("devenv: trio-kv needs Python 3.11 or newer")
    fresh = not venv_python().exists()
    if fresh:
        print(f"devenv: creating {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if fresh or not STAMP.exists() or STAMP.read_text().strip() != wanted_stamp():
        print("devenv: installing trio-kv and its dependencies into .venv ...", flush=True)
        subprocess.run([str(venv_python()), "-m", "pip", "install", "--quiet", "-e", str(REPO)],
                       check=True)
        STAMP.write_text(wanted_stamp() + "\n")


def reexec_in_venv() -> None:
    """Run the rest of this script with the venv's interpreter (which has httpx etc.)."""
    if os.environ.get(REEXEC_FLAG) == "1" or Path(sys.prefix).resolve() == VENV.resolve():
        return
    env = dict(os.environ, **{REEXEC_FLAG: "1"})
    python = str(venv_python())
    os.execve(python, [python, str(Path(__file__).resolve()), *sys.argv[1:]], env)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--nodes", type=int, default=3, help="number of nodes")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--backend", choices=("local", "netns", "podman"), default="local")
    parser.add_argument("--base-port", type=int, default=8081,
                        help="local backend: port of node 1 (node i gets base+i-1)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for every node, e.g. KV_LOG_LEVEL=debug")
    parser.add_argument("--no-secret", action="store_true",
                        help="bare nodes: no cluster secret (default: a random one)")
    parser.add_argument("--prefix", default="tkv", help="name prefix of what is created")
    parser.add_argument("--data", default=str(REPO / ".devenv-data"), metavar="DIR",
                        help="local/netns: node i keeps its data in DIR/<prefix>-n<i> and comes "
                        "back with it (podman: a volume per container)")
    parser.add_argument("--memory", action="store_true",
                        help="run the nodes in memory only (a restart starts empty)")
    parser.add_argument("--no-install", action="store_true",
                        help="use the current interpreter as is (no venv handling)")
    return parser.parse_args(argv)


def curl_lines(urls: list[str], secret: str = "") -> list[str]:
    """Ready-to-paste commands: write through one node, read through another, and (with a
    secret) how an operator's PUT /view carries it."""
    first, last = urls[0], urls[-1]
    lines = [
        f"curl -s -X PUT {first}/data/hello -H 'Content-Type: application/json' "
        "-d '{\"value\": \"world\"}'",
        f"curl -s {last}/data/hello",
        f"curl -s {first}/view",
    ]
    if secret:
        lines.append(f"curl -s {first}/view | python3 -c 'import json,sys; "
                     "print(json.dumps({\"view\": json.load(sys.stdin)[\"view\"]}))' | "
                     f"curl -s -X PUT {first}/view -H 'X-KV-Secret: {secret}' "
                     "-H 'Content-Type: application/json' -d @-")
    return lines


def node_env(args: argparse.Namespace) -> dict[str, str]:
    """``--env`` settings plus the cluster secret: a fresh random one unless ``--no-secret``
    or ``--env KV_CLUSTER_SECRET=...``."""
    import secrets

    from chaos.cli import parse_env

    env = parse_env(args.env)
    env.setdefault("KV_CLUSTER_SECRET", "" if args.no_secret else secrets.token_hex(16))
    if args.memory:
        env.setdefault("KV_DURABILITY", "none")
    elif args.backend != "podman":  # durable by default (the image's KV_DATA_DIR for podman)
        env.setdefault("KV_DATA_DIR", str(Path(args.data).resolve() / f"{args.prefix}-n{{id}}"))
    return env


def run_cluster(args: argparse.Namespace) -> int:
    """Start the cluster, print how to use it, wait for Ctrl-C, tear down."""
    sys.path.insert(0, str(REPO))
    from chaos.cluster import Cluster
    from chaos.util import ChaosError

    stopping = False

    def on_signal(_sig: int, _frame: object) -> None:
        # Once: a second signal (Ctrl-C pressed twice, or SIGTERM sent to both a wrapper
        # and us) would abort the teardown half way and orphan the nodes.
        nonlocal stopping
        if stopping:
            print(f"devenv: still stopping the cluster (kill -9 {os.getpid()} abandons it)",
                  file=sys.stderr, flush=True)
            return
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    options = {"base_port": args.base_port} if args.backend == "local" else {}
    env = node_env(args)
    try:
        started = time.monotonic()
        cluster = Cluster.up(args.nodes, args.shards, backend=args.backend, prefix=args.prefix,
                             env=env, **options)
    except ChaosError as exc:
        print(f"devenv: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndevenv: interrupted; everything removed", file=sys.stderr)
        return 130
    try:
        urls = [n.url for n in cluster.nodes]
        print(f"\ntrio-kv dev cluster up in {time.monotonic() - started:.1f}s "
              f"({args.backend} backend, {args.nodes} nodes, {args.shards} shard(s)):\n")
        print(cluster.describe())
        secret = cluster.state.secret
        print("\nTry:\n  " + "\n  ".join(curl_lines(urls, secret)))
        if secret:
            print(f"\nCluster secret (X-KV-Secret for PUT /view): {secret}")
        else:
            print("\nNo cluster secret (--no-secret): anyone who reaches a port can change "
                  "the view")
        if args.backend == "local":
            print("\nFaults: python -m chaos kill 2 / restart 2 (partitions need "
                  "--backend netns or podman, as root)")
        else:
            print(f"\nFaults (another terminal): {sys.executable} -m chaos partition 1 / 2 ... "
                  "| heal | kill N | restart N | delay N MS")
        print(f"Logs: {cluster.workdir / 'logs'}" if args.backend != "podman"
              else "Logs: podman logs <prefix>-n<N>")
        if "KV_DATA_DIR" in env:
            print(f"Data: {env['KV_DATA_DIR'].replace('{id}', '<N>')} (kept after Ctrl-C; "
                  "--memory runs without)")
        elif args.memory:
            print("Data: in memory only (--memory)")
        print("\nCtrl-C stops the cluster.", flush=True)
        while True:
            time.sleep(1)
            dead = [n.id for n in cluster.nodes if not cluster.backend.alive(n)]
            if dead and not (cluster.workdir / "state.json").exists():
                print("devenv: the cluster was taken down elsewhere", file=sys.stderr)
                return 0
    except KeyboardInterrupt:
        pass
    finally:
        print("\ndevenv: stopping the cluster ...", flush=True)
        try:
            cluster.down()
        except ChaosError as exc:
            print(f"devenv: teardown: {exc}", file=sys.stderr)
    print("devenv: everything removed")
    return 0


def main() -> int:
    """Bootstrap the venv if needed, then run the cluster inside it."""
    args = parse_args()
    if not args.no_install:
        ensure_venv()
        reexec_in_venv()
    return run_cluster(args)


if __name__ == "__main__":
    sys.exit(main())
