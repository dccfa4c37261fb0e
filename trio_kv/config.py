"""One ``Config`` for a node: every limit and timeout explicit and configurable.

Each field can be set from the environment as ``KV_<FIELD>`` (upper case) and from the command
line as ``--<field-with-dashes>``; the node id, host and port also from ``NODE_IDENTIFIER``,
``HOST`` and ``PORT`` as the container runs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import NoReturn


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
    max_token_deps: int = 256  # dependencies in a causal-metadata token, in or out
    max_token_bytes: int = 32 << 10  # encoded causal-metadata JSON, in or out
    max_clock_skew: float = 60.0  # seconds a timestamp may run ahead of this node's clock
    max_peer_message_bytes: int = 16 << 20  # one /internal/ request or peer answer
    max_view_nodes: int = 1024  # nodes (and shards) one view may name
    wait_deadline: float = 30.0  # causal waits, forwarding retries, mid-change waits
    max_waiting: int = 1000  # requests parked in a causal or handoff wait at once; more get 503
    # replication
    retry_interval: float = 0.2  # retry period towards an unreachable peer (was gossip_interval)
    heartbeat_interval: float = 5.0  # idle summary exchange; news is pushed at once anyway
    replication_linger: float = 0.015  # least time between pushes to one peer under load
    replication_report_interval: float = 0.1  # an empty push waits this long after the last
    batch_entries: int = 2000
    batch_bytes: int = 4 << 20
    # peer calls
    peer_transport: str = "channel"  # channel (one connection per peer) | http (a call each)
    channel_max_in_flight: int = 256  # frames served at once on one incoming channel
    channel_send_linger: float = 0.005  # a frame waits at most this for the node to go idle
    channel_stall_timeout: float = 2.0  # resending this long unacknowledged: a partition
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
    put_view_timeout: float = 60.0  # a PUT /view answers by then (503 if still changing)
    handoff_batch_entries: int = 1000
    handoff_batch_bytes: int = 4 << 20  # one handoff batch or pull page, encoded
    handoff_retry_interval: float = 1.0
    handoff_later_wait: float = 3.0  # a receiver that said "I will pull it" must hold it by then
    fence_probe_interval: float = 1.0  # while fenced, how often to ask the fencing shard
    # cross-shard pruning (core/crossdeps.py): values' dependencies on other shards' keys
    crossdeps_interval: float = 0.1  # least time between two rounds of stability queries
    crossdeps_queue: int = 10_000  # local keys waiting to have such dependencies proven
    stable_query_deps: int = 1000  # dependencies asked about in one /internal/stable query
    # durability (persist.py): a data directory makes writes survive kill -9 of the node
    data_dir: str = ""  # empty: memory only, as are nodes started with durability none
    durability: str = "batch"  # always (fsync per ack) | batch (group commit) | none
    max_commit_seconds: float = 30.0  # a commit slower than this stops the node (stuck disk)
    tombstone_grace: float = 3600.0  # a delete is kept at least this long (seconds)
    tombstone_interval: float = 10.0  # how often stable tombstones are looked for
    # server
    keep_alive_timeout: float = 30.0
    read_timeout: float = 10.0  # seconds a client may take to send a request body
    shutdown_grace: float = 5.0
    log_level: str = "info"
    log_format: str = "auto"  # json | text | auto (text on a terminal, JSON otherwise)
    access_log: bool = False  # one log line per HTTP request
    # client conveniences
    max_page_items: int = 1000  # GET /data?limit= at most this
    max_request_id_bytes: int = 128
    # Allocations between young-generation GC passes (Python's default: 700).  Refcounting frees
    # almost everything a request makes; frequent passes only cost latency (bench, 1x3 PUT:
    # p99/p50 3.0-3.3 at 700, 1.6-1.9 at 20,000).  0 keeps Python's default.
    gc_gen0_threshold: int = 20_000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f.name, f"{value!r} is not a finite number")
            if f.name in _POSITIVE and value <= 0:
                raise ConfigError(f.name, f"must be positive, not {value!r}")
            if f.name in _NON_NEGATIVE and value < 0:
                raise ConfigError(f.name, f"must not be negative, not {value!r}")
        if self.node_id is not None and not 0 <= self.node_id < 1 << 53:
            raise ConfigError("node_id", "must be a non-negative integer below 2**53")
        if not 0 <= self.port < 65536:
            raise ConfigError("port", f"{self.port} is not a TCP port")
        if self.log_level.upper() not in _LOG_LEVELS:
            raise ConfigError("log_level", f"must be one of {', '.join(_LOG_LEVELS).lower()}")
        if self.log_format not in _LOG_FORMATS:
            raise ConfigError("log_format", f"must be one of {', '.join(_LOG_FORMATS)}")
        if self.peer_transport not in _PEER_TRANSPORTS:
            raise ConfigError("peer_transport", f"must be one of {', '.join(_PEER_TRANSPORTS)}")
        if self.durability not in _DURABILITY:
            raise ConfigError("durability", f"must be one of {', '.join(_DURABILITY)}")
        if self.tombstone_interval <= 0:
            raise ConfigError("tombstone_interval", "must be positive")
        if 0 < self.channel_stall_timeout < 0.5:
            raise ConfigError("channel_stall_timeout", "must be 0 (off) or at least 0.5 s: "
                              "below that one lost segment, resent after 0.2 s, takes a "
                              "channel down")
        if self.stable_query_deps < self.max_token_deps:
            raise ConfigError(
                "stable_query_deps", f"{self.stable_query_deps} is below max_token_deps "
                f"({self.max_token_deps}): one value's dependencies must fit in one query",
            )
        largest_entry = 6 * (self.max_value_bytes + self.max_key_bytes) + self.max_token_bytes
        need = max(self.batch_bytes, self.handoff_batch_bytes, largest_entry) + (64 << 10)
        if self.max_peer_message_bytes < need:
            raise ConfigError(
                "max_peer_message_bytes", f"{self.max_peer_message_bytes} is below what a batch "
                f"or one entry may need ({need}: batch_bytes, handoff_batch_bytes, or 6 x "
                "max_value_bytes, the worst JSON escaping)",
            )

    @property
    def client_keepalive_expiry(self) -> float:
        """Below the server's keep-alive, so a reused connection is never one being closed."""
        return max(0.5, self.keep_alive_timeout / 2)

    @property
    def connection_read_timeout(self) -> float:
        """How long an open connection may send nothing while a call on it may still be
        answered: above the longest answer (a causal wait, or a PUT /view)."""
        return (max(self.keep_alive_timeout, self.wait_deadline, self.put_view_timeout)
                + self.read_timeout + 1)

    @property
    def max_skew_ms(self) -> int:
        return int(self.max_clock_skew * 1000)


class ConfigError(ValueError):
    """A setting is invalid: says which, and why, in one line."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_FORMATS = ("auto", "json", "text")
_NON_NEGATIVE = {
    "gc_gen0_threshold", "shutdown_grace", "replication_linger", "tombstone_grace",
    "channel_send_linger", "replication_report_interval", "channel_stall_timeout",
}
_DURABILITY = ("always", "batch", "none")
_PEER_TRANSPORTS = ("channel", "http")
_POSITIVE = {
    "max_value_bytes", "max_key_bytes", "max_request_bytes", "max_header_bytes",
    "max_token_deps", "max_token_bytes", "max_clock_skew", "max_peer_message_bytes",
    "max_view_nodes", "wait_deadline", "max_waiting", "retry_interval", "heartbeat_interval",
    "batch_entries", "batch_bytes", "channel_max_in_flight", "connect_timeout", "peer_timeout",
    "forward_attempt_timeout",
    "forward_concurrency", "forward_retry_after", "max_hops", "dedup_entries", "vnodes",
    "view_change_deadline", "put_view_timeout", "handoff_batch_entries", "handoff_batch_bytes",
    "handoff_retry_interval", "handoff_later_wait", "fence_probe_interval",
    "crossdeps_interval", "crossdeps_queue",
    "stable_query_deps", "keep_alive_timeout", "read_timeout",
    "max_page_items", "max_request_id_bytes", "max_commit_seconds",
}


_ALIASES = {
    "node_id": "NODE_IDENTIFIER", "host": "HOST", "port": "PORT",
    "retry_interval": "KV_GOSSIP_INTERVAL",  # its old name, still accepted
}
_OLD_FLAGS = {"retry_interval": "--gossip-interval"}
_SHORT = {"node_id": "--id"}


def _convert(field_type: object, raw: str) -> object:
    text = str(field_type)
    if text in ("bool", "<class 'bool'>"):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{raw!r} is not true or false")
    try:
        if "int" in text and "None" in text:
            return int(raw) if raw else None
        if text in ("int", "<class 'int'>"):
            return int(raw)
        if text in ("float", "<class 'float'>"):
            return float(raw)
    except ValueError:
        kind = "a number" if "float" in text else "a whole number"
        raise ValueError(f"{raw!r} is not {kind}") from None
    return raw


def _fail(setting: str, problem: str) -> NoReturn:
    """One line naming the setting and the problem, exit code 2 (as argparse does)."""
    print(f"trio-kv: error: {setting}: {problem}", file=sys.stderr)
    sys.exit(2)


def build_parser(prog: str = "trio-kv [serve]") -> argparse.ArgumentParser:
    """One flag per Config field, each with a sentence, its unit, default and variable."""
    from .config_help import describe

    parser = argparse.ArgumentParser(
        prog=prog, description="Run one trio-kv node (see README.md and docs/API.md).",
        epilog="Client commands: trio-kv put|get|delete|ls|view|status --help.",
    )
    for f in fields(Config):
        flag = _SHORT.get(f.name, "--" + f.name.replace("_", "-"))
        env = f"KV_{f.name.upper()}" + (f" or {_ALIASES[f.name]}" if f.name in _ALIASES else "")
        old = [_OLD_FLAGS[f.name]] if f.name in _OLD_FLAGS else []
        parser.add_argument(
            flag, *old, dest=f.name, default=None, metavar=f.name.upper(),
            help=f"{describe(f.name)} Default {f.default!r}; env {env}.",
        )
    return parser


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Defaults, then environment, then command line."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for f in fields(Config):
        for name in (f"KV_{f.name.upper()}", _ALIASES.get(f.name)):
            if name and env.get(name):
                try:
                    values[f.name] = _convert(f.type, env[name])
                except ValueError as exc:
                    _fail(name, str(exc))
                sources[f.name] = name
    parser = build_parser()
    args = parser.parse_args(argv)
    for f in fields(Config):
        raw = getattr(args, f.name)
        if raw is not None:
            flag = _SHORT.get(f.name, "--" + f.name.replace("_", "-"))
            try:
                values[f.name] = _convert(f.type, raw)
            except ValueError as exc:
                _fail(flag, str(exc))
            sources[f.name] = flag
    try:
        return dataclasses.replace(Config(), **values)  # type: ignore[arg-type]
    except ConfigError as exc:
        _fail(sources.get(exc.name, exc.name), str(exc).split(": ", 1)[1])
