"""``trio-kv put|get|delete|ls|view|status``: the store from a shell, causally ordered.

The session (causal metadata) lives in a file (``--session`` or ``TRIO_KV_SESSION``), read
before and written after every command under an exclusive lock, so successive commands of
one shell session are causally ordered even when they go to different nodes.  Output is for
people by default and JSON with ``--json``.  Exit codes: 0 done, 1 no such key, 2 bad
usage or request refused, 3 cluster unavailable, 4 a write's outcome is unknown.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import orjson

from .client import Client
from .errors import BadRequest, KeyNotFound, OutcomeUnknown, TrioKVError, Unavailable

COMMANDS = ("put", "get", "delete", "ls", "view", "status")
EXIT_OK, EXIT_MISSING, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_UNKNOWN = 0, 1, 2, 3, 4


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--node", action="append", metavar="HOST:PORT",
        help="a node to talk to (repeat, or comma-separate, for failover); env TRIO_KV_NODES; "
        "default 127.0.0.1:8081")
    common.add_argument(
        "--session", metavar="FILE", default=os.environ.get("TRIO_KV_SESSION"),
        help="file holding the causal session between commands (env TRIO_KV_SESSION); "
        "without one each command starts a fresh session")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    common.add_argument("--timeout", type=float, default=40.0, metavar="SECONDS",
                        help="longest wait for one node's answer, in seconds (default 40)")
    common.add_argument("--retries", type=int, default=4, metavar="N",
                        help="other attempts after a failure, at the next node (default 4)")
    parser = argparse.ArgumentParser(
        prog="trio-kv", description="trio-kv client. Run a node with: trio-kv serve --help.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("put", parents=[common], help="write a key")
    p.add_argument("key")
    p.add_argument("value", help="the value; - reads it from standard input")
    p = sub.add_parser("get", parents=[common], help="read a key (exit 1 if missing)")
    p.add_argument("key")
    p = sub.add_parser("delete", parents=[common], help="delete a key (exit 1 if missing)")
    p.add_argument("key")
    p = sub.add_parser("ls", parents=[common], help="list every key and value of the store")
    p.add_argument("--page-size", type=int, default=1000, metavar="N",
                   help="keys fetched per request (default 1000)")
    p = sub.add_parser("view", parents=[common], help="show the view, or send one with --set")
    p.add_argument("--set", metavar="FILE", dest="set_view",
                   help="send this view (JSON {\"view\": ...}; - for standard input) to every "
                   "node it names")
    p.add_argument("--secret", default=os.environ.get("TRIO_KV_SECRET"),
                   help="cluster secret for --set, if the cluster has one (env TRIO_KV_SECRET)")
    sub.add_parser("status", parents=[common], help="each node's id, shard, view and state")
    return parser


def _nodes(args: argparse.Namespace) -> list[str]:
    raw = args.node or [os.environ.get("TRIO_KV_NODES") or "127.0.0.1:8081"]
    return [n for item in raw for n in item.split(",") if n.strip()]


@contextlib.contextmanager
def _session_file(path: str | None) -> Iterator[dict[str, Any]]:
    """The stored session, locked for the command; written back (atomically) afterwards."""
    if path is None:
        yield {}
        return
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raw = b""
        try:
            session = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"session file {path} is not JSON; delete it to start afresh") \
                from exc
        if not isinstance(session, dict):
            raise BadRequest(f"session file {path} does not hold a session")
        holder = {"session": session}
        try:
            yield holder
        finally:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                       prefix=".session-")
            with os.fdopen(fd, "wb") as f:
                f.write(orjson.dumps(holder["session"]))
            os.replace(tmp, path)


def _show_view(status: dict[str, Any], out: TextIO) -> None:
    view = status.get("view")
    if not view:
        print(f"node {status.get('id')}: no view yet", file=out)
        return
    change = status.get("change") or {}
    print(f"view {status.get('view_id')} (epoch {status.get('epoch')}), "
          f"{sum(len(m) for m in view.values())} nodes in {len(view)} shards; "
          f"node {status.get('id')} is in shard {status.get('shard') or '(none: routing)'}; "
          f"change {change.get('state', '?')}", file=out)
    for name in sorted(view):
        members = ", ".join(f"{m['id']}@{m['address']}" for m in view[name])
        print(f"  {name}: {members}", file=out)


def _execute(kv: Client, args: argparse.Namespace, out: TextIO) -> Any:
    """Run the command; returns what --json prints."""
    cmd = args.command
    if cmd == "put":
        value = sys.stdin.read() if args.value == "-" else args.value
        kv.put(args.key, value)
        if not args.json:
            print("OK", file=out)
        return {"ok": True}
    if cmd == "get":
        value = kv.get(args.key)
        if not args.json:
            print(value, file=out)
        return {"key": args.key, "value": value}
    if cmd == "delete":
        kv.delete(args.key)
        if not args.json:
            print("deleted", file=out)
        return {"ok": True}
    if cmd == "ls":
        items = kv.items(page_size=args.page_size)
        if not args.json:
            for key in sorted(items):
                print(f"{key}\t{items[key]}", file=out)
        return {"items": items}
    if cmd == "view":
        if args.set_view:
            if args.set_view == "-":
                source = sys.stdin.read()
            else:
                with open(args.set_view) as f:
                    source = f.read()
            try:
                view = orjson.loads(source)
            except orjson.JSONDecodeError as exc:
                raise BadRequest(f"{args.set_view}: not JSON") from exc
            if not isinstance(view, dict) or "view" not in view:
                raise BadRequest("a view file holds {\"view\": {shard: [{address, id}]}}")
            kv.put_view(view)
            if not args.json:
                print("view applied", file=out)
            return {"ok": True}
        status = kv.view()
        if not args.json:
            _show_view(status, out)
        return status
    statuses = kv.status()
    if not args.json:
        for s in statuses:
            if "error" in s:
                print(f"{s['node']}\tDOWN\t{s['error']}", file=out)
                continue
            change = (s.get("change") or {}).get("state", "?")
            print(f"{s['node']}\tid {s.get('id')}\tshard {s.get('shard') or '-'}\tview "
                  f"{s.get('view_id') or '-'}\tepoch {s.get('epoch')}\tkeys {s.get('keys')}\t"
                  f"{change}", file=out)
    return {"nodes": statuses}


def _exit_code(exc: TrioKVError) -> int:
    if isinstance(exc, KeyNotFound):
        return EXIT_MISSING
    if isinstance(exc, OutcomeUnknown):
        return EXIT_UNKNOWN
    if isinstance(exc, Unavailable):
        return EXIT_UNAVAILABLE
    return EXIT_USAGE if exc.status in (0, 400, 401, 404, 413, 431) else EXIT_UNAVAILABLE


def run(argv: Sequence[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(list(argv))
    try:
        nodes = _nodes(args)
        with (
            _session_file(args.session) as holder,
            Client(nodes, session=holder.get("session"), timeout=args.timeout,
                   retries=args.retries, secret=getattr(args, "secret", None)) as kv,
        ):
            try:
                result = _execute(kv, args, out)
            finally:
                if "session" in holder:
                    holder["session"] = kv.session
    except TrioKVError as exc:
        if args.json:
            print(orjson.dumps({"error": exc.message, "status": exc.status}).decode(), file=err)
        else:
            print(f"trio-kv: {exc.message}", file=err)
        return _exit_code(exc)
    except (ValueError, OSError) as exc:
        print(f"trio-kv: {exc}", file=err)
        return EXIT_USAGE
    if args.json:
        print(orjson.dumps(result).decode(), file=out)
    return EXIT_OK
