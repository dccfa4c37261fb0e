"""``python -m trio_kv`` / ``trio-kv``: run one node until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import trio

from .config import load_config
from .persist import MODES
from .server import serve
from .storage import StorageError


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s node{config.node_id} %(name)s %(levelname)s %(message)s",
    )
    for noisy in ("httpx", "httpcore"):  # one line per peer request: too costly and too loud
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if config.node_id is None:
        sys.exit("trio-kv: a node id is required (--id N or NODE_IDENTIFIER=N)")
    if config.durability not in MODES:
        print(f"trio-kv: durability: {config.durability!r} is not one of {', '.join(MODES)}",
              file=sys.stderr)
        sys.exit(2)
    try:
        trio.run(serve, config)
    except* StorageError as group:
        # A damaged data directory is never served as an empty store: stop, naming the file.
        for exc in _leaves(group):
            print(f"trio-kv: cannot start: {exc}", file=sys.stderr)
        sys.exit(3)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


if __name__ == "__main__":
    main()
