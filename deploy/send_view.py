#!/usr/bin/env python3
"""Send a trio-kv view to every node, once they all answer: the cluster's one-shot bootstrap.

Standard library only, so it runs from the node image itself (it is installed there as
``/usr/local/bin/trio-kv-send-view``), from a Kubernetes Job, or from any machine with Python.

    # StatefulSet "trio-kv" behind headless service "trio-kv", 3 pods, ids 1..3:
    trio-kv-send-view --pattern 'trio-kv-{i}.trio-kv:8081' --count 3 --shards 1
    # explicit nodes:
    trio-kv-send-view --node 1=10.0.0.2:8081 --node 2=10.0.0.3:8081 --shards 1

Pod ``trio-kv-<i>`` gets id ``i + 1`` (the node image's StatefulSet command derives
``NODE_IDENTIFIER`` the same way).  Shards are contiguous groups of ids, as in ``chaos``.
The view addresses are the names given, so pods keep their place in the view across restarts
even though their IPs change.

The nodes' cluster secret is sent as ``X-KV-Secret``: from ``KV_CLUSTER_SECRET`` (the same
variable the nodes read) or ``--secret-file``.  Without one it refuses to run unless told
``--no-secret`` (bare nodes accept anyone's view).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request


def plan(nodes: list[tuple[int, str]], shards: int) -> dict[str, list[dict[str, object]]]:
    """Split the nodes, by id, into ``shards`` contiguous groups."""
    if not 1 <= shards <= len(nodes):
        raise SystemExit(f"--shards must be between 1 and the number of nodes ({len(nodes)})")
    ordered = sorted(nodes)
    view: dict[str, list[dict[str, object]]] = {}
    for index, (node_id, address) in enumerate(ordered):
        name = f"shard{index * shards // len(ordered) + 1}"
        view.setdefault(name, []).append({"address": address, "id": node_id})
    return view


def call(method: str, url: str, body: object | None, timeout: float,
         secret: str = "") -> tuple[int, str]:
    """One HTTP request; (status, text), with status 0 when the node is unreachable."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if secret:
        headers["X-KV-Secret"] = secret
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, ValueError) as exc:
        return 0, str(exc)


def main(argv: list[str] | None = None) -> int:
    """Wait for every node's /ping, then PUT /view to each until all answer 200."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--node", action="append", default=[], metavar="ID=HOST:PORT")
    parser.add_argument("--pattern", help="address pattern with {i} = pod ordinal (0-based)")
    parser.add_argument("--count", type=int, default=0, help="number of pods for --pattern")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--wait", type=float, default=300.0,
                        help="give up after this many seconds (default %(default)s)")
    parser.add_argument("--secret-file", help="file holding the cluster secret "
                        "(default: $KV_CLUSTER_SECRET)")
    parser.add_argument("--no-secret", action="store_true",
                        help="the nodes run without a cluster secret")
    args = parser.parse_args(argv)
    secret = os.environ.get("KV_CLUSTER_SECRET", "")
    if args.secret_file:
        with open(args.secret_file) as f:
            secret = f.read().strip()
    if not secret and not args.no_secret:
        parser.error("no cluster secret: set KV_CLUSTER_SECRET or --secret-file "
                     "(or --no-secret for nodes started without one)")

    nodes: list[tuple[int, str]] = []
    for spec in args.node:
        node_id, _, address = spec.partition("=")
        nodes.append((int(node_id), address))
    if args.pattern:
        nodes += [(i + 1, args.pattern.format(i=i)) for i in range(args.count)]
    if not nodes:
        parser.error("give --node ID=HOST:PORT (repeatable) or --pattern with --count")
    body = {"view": plan(nodes, args.shards)}
    print("view:", json.dumps(body["view"]), flush=True)

    deadline = time.monotonic() + args.wait
    pending = dict(nodes)
    while pending:
        for node_id, address in sorted(pending.items()):
            status, _ = call("GET", f"http://{address}/ping", None, timeout=2)
            if status != 200:
                continue
            status, text = call("PUT", f"http://{address}/view", body, timeout=30,
                                secret=secret)
            if status == 200:
                print(f"node {node_id} ({address}) accepted the view", flush=True)
                del pending[node_id]
            else:
                print(f"node {node_id} ({address}): {status} {text[:200]}", flush=True)
        if pending:
            if time.monotonic() > deadline:
                print(f"gave up: no answer from {sorted(pending)}", file=sys.stderr)
                return 1
            time.sleep(1)
    print("every node serves the view")
    return 0


if __name__ == "__main__":
    sys.exit(main())
