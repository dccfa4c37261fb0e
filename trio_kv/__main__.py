"""``python -m trio_kv`` / ``trio-kv``: run one node, or (with a command) be a client.

``python -m trio_kv [serve] --id 1 --port 8081`` runs a node until SIGTERM or SIGINT, as
containers and tests start it; ``python -m trio_kv put|get|delete|ls|view|status ...`` is
the command-line client (``trio_kv.cli``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import trio

from .cli import COMMANDS
from .config import load_config
from .logs import configure
from .persist import PersistFailed
from .server import serve
from .storage import StorageError


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        from .cli import run

        sys.exit(run(args))
    if args and args[0] == "serve":
        args = args[1:]
    config = load_config(args)
    try:
        configure(config)
    except ValueError as exc:
        print(f"trio-kv: {exc}", file=sys.stderr)
        sys.exit(2)
    if config.node_id is None:
        print("trio-kv: error: --id: a node id is required (--id N or NODE_IDENTIFIER=N)",
              file=sys.stderr)
        sys.exit(2)
    try:
        trio.run(serve, config)
    except* StorageError as group:
        # A damaged data directory is never served as an empty store: stop, naming the file.
        for leaf in _leaves(group):
            print(f"trio-kv: cannot start: {leaf}", file=sys.stderr)
        sys.exit(3)
    except* PersistFailed as group:
        # The disk failed or stopped answering: acknowledging more would be a lie.
        for leaf in _leaves(group):
            print(f"trio-kv: stopped: the data directory failed: {leaf}", file=sys.stderr)
        sys.exit(3)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


if __name__ == "__main__":
    main()
