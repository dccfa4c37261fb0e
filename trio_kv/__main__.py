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
from .server import serve


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
    trio.run(serve, config)


if __name__ == "__main__":
    main()
