"""One ``Config`` for a node: every limit and timeout explicit and configurable.

Each field can be set from the environment as ``KV_<FIELD>`` (upper case) and from the command
line as ``--<field-with-dashes>``; the node id, host and port also from ``NODE_IDENTIFIER``,
``HOST`` and ``PORT`` as the container runs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Config:
    node_id: int | None = None
    host: str = "0.0.0.0"
    port: int = 8081
    cluster_secret: str = ""
    # client-facing limits
    max_value_bytes: int = 1 << 20
    max_key_bytes: int = 1024
    max_request_bytes: int = 8 << 20
    max_header_bytes: int = 64 << 10
    wait_deadline: float = 30.0  # causal waits, forwarding retries, mid-change waits
    max_waiting: int = 1000  # requests parked in a causal or handoff wait at once; more get 503
    # replication
    gossip_interval: float = 0.2  # retry period towards an unreachable peer
    heartbeat_interval: float = 5.0  # idle summary exchange; news is pushed at once anyway
    replication_linger: float = 0.015  # least time between pushes to one peer under load
    batch_entries: int = 2000
    batch_bytes: int = 4 << 20
    # peer calls
    connect_timeout: float = 1.0
    peer_timeout: float = 5.0  # one replication or handoff call
    forward_attempt_timeout: float = 5.0  # one forwarded request to one replica
    forward_concurrency: int = 64  # in-flight forwarded requests per node
    forward_retry_after: float = 5.0  # a replica that failed is tried last for this long
    max_hops: int = 3  # forwards between nodes that disagree on the view
    dedup_entries: int = 10_000  # answers to forwarded writes kept to deduplicate retries
    # views
    vnodes: int = 128
    view_change_deadline: float = 12.0
    handoff_batch_entries: int = 1000
    handoff_retry_interval: float = 1.0
    fence_probe_interval: float = 1.0  # while fenced, how often to ask the fencing shard
    # durability (persist.py): a data directory makes writes survive kill -9 of the node
    data_dir: str = ""  # empty: memory only, as are nodes started with durability none
    durability: str = "batch"  # always (fsync per ack) | batch (group commit) | none
    tombstone_grace: float = 3600.0  # a delete is kept at least this long (seconds)
    tombstone_interval: float = 10.0  # how often stable tombstones are looked for
    # server
    keep_alive_timeout: float = 30.0
    shutdown_grace: float = 5.0
    log_level: str = "info"
    # Allocations between young-generation GC passes (Python's default: 700).  Refcounting frees
    # almost everything a request makes; frequent passes only cost latency (bench, 1x3 PUT:
    # p99/p50 3.0-3.3 at 700, 1.6-1.9 at 20,000).  0 keeps Python's default.
    gc_gen0_threshold: int = 20_000

    @property
    def client_keepalive_expiry(self) -> float:
        """Below the server's keep-alive so a reused connection is never one being closed."""
        return max(1.0, self.keep_alive_timeout / 2)


_ALIASES = {"node_id": "NODE_IDENTIFIER", "host": "HOST", "port": "PORT"}
_SHORT = {"node_id": "--id"}


def _convert(field_type: object, raw: str) -> object:
    text = str(field_type)
    if "int" in text and "None" in text:
        return int(raw) if raw else None
    if text in ("int", "<class 'int'>"):
        return int(raw)
    if text in ("float", "<class 'float'>"):
        return float(raw)
    return raw


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Defaults, then environment, then command line."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for f in fields(Config):
        for name in (f"KV_{f.name.upper()}", _ALIASES.get(f.name)):
            if name and env.get(name):
                values[f.name] = _convert(f.type, env[name])
    parser = argparse.ArgumentParser(
        prog="trio-kv", description="Run one trio-kv node (see README.md and API.md)."
    )
    for f in fields(Config):
        flag = _SHORT.get(f.name, "--" + f.name.replace("_", "-"))
        parser.add_argument(
            flag, dest=f.name, default=None, metavar=f.name.upper(),
            help=f"default {f.default!r}; env KV_{f.name.upper()}"
            + (f" or {_ALIASES[f.name]}" if f.name in _ALIASES else ""),
        )
    args = parser.parse_args(argv)
    for f in fields(Config):
        raw = getattr(args, f.name)
        if raw is not None:
            try:
                values[f.name] = _convert(f.type, raw)
            except ValueError:
                parser.error(f"{f.name}: {raw!r} is not a valid value")
    return dataclasses.replace(Config(), **values)  # type: ignore[arg-type]
