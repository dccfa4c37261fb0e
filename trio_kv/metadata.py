"""Client causal metadata: the token clients carry between requests.

Shape: ``{"deps": {"<key>": [hlc, node], ...}}`` -- for each key of the client's causal past
whose write has not yet reached every replica of its shard, the version it must see.  Entries
are dropped (pruned) once the write is stable, so the token tracks only recent, unreplicated
writes and never grows with the number of keys in the store.  ``{}`` and ``null`` mean no deps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .clock import LOGICAL_BITS, Version

Deps = dict[str, Version]

MAX_NODE_ID = (1 << 53) - 1  # node ids stay exact in every JSON implementation
MAX_HLC = (1 << 63) - 1


class MetadataError(ValueError):
    """Client metadata is not of the shape this store issues."""


@dataclass(frozen=True, slots=True)
class TokenRules:
    """What a token (or a stored write's dependencies) may hold.  Bounds keep every token a
    reader gets small enough to send back in a header; the clock bound keeps one forged
    timestamp from dragging every node's hybrid clock towards 2**63."""

    max_deps: int = 256
    max_bytes: int = 32 << 10
    max_key_bytes: int = 1024
    max_skew_ms: int = 60_000

    def latest_hlc(self, now_ms: int) -> int:
        """The highest timestamp accepted at wall time ``now_ms``."""
        return ((now_ms + self.max_skew_ms) << LOGICAL_BITS) | ((1 << LOGICAL_BITS) - 1)

    def fits(self, deps: Mapping[str, Version]) -> bool:
        return not deps or (
            len(deps) <= self.max_deps and token_bytes(deps) <= self.max_bytes
        )


def token_bytes(deps: Mapping[str, Version]) -> int:
    return len(orjson.dumps(render_metadata(deps)))


def check_version(hlc: object, node: object, latest_hlc: int) -> Version:
    """A ``[timestamp, node]`` pair from the network, bounded; ``MetadataError`` otherwise."""
    if type(hlc) is not int or type(node) is not int:
        raise MetadataError("a version must be a [timestamp, node] pair of integers")
    if not 0 <= node <= MAX_NODE_ID:
        raise MetadataError(f"node id {node} is out of range")
    if not 0 <= hlc <= latest_hlc:
        ahead = ((hlc >> LOGICAL_BITS) - (latest_hlc >> LOGICAL_BITS)) / 1000
        raise MetadataError(
            "a timestamp is negative" if hlc < 0 else
            f"a timestamp is {ahead:.3f}s past the allowed clock skew (max_clock_skew) "
            "ahead of this node's clock"
        )
    return Version(hlc, node)


def check_deps(raw: object, rules: TokenRules, latest_hlc: int) -> Deps:
    """``{key: [hlc, node]}`` from the network: every key and version checked, size bounded."""
    if not isinstance(raw, dict):
        raise MetadataError("causal-metadata 'deps' must be an object")
    if len(raw) > rules.max_deps:
        raise MetadataError(
            f"causal-metadata holds {len(raw)} dependencies; the limit is {rules.max_deps} "
            "(max_token_deps)"
        )
    deps: Deps = {}
    for key, pair in raw.items():
        if not isinstance(key, str) or not key or len(key.encode()) > rules.max_key_bytes:
            raise MetadataError("causal-metadata names a key that is empty or too long")
        if not isinstance(pair, list) or len(pair) != 2:
            raise MetadataError("causal-metadata 'deps' entries must be [timestamp, node] pairs")
        deps[key] = check_version(pair[0], pair[1], latest_hlc)
    return deps


def parse_metadata(raw: object, rules: TokenRules | None = None, now_ms: int = 0) -> Deps:
    """A client's token, validated; without ``rules`` (tests) only its shape is checked."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MetadataError("causal-metadata must be a JSON object")
    extra = set(raw) - {"deps"}
    if extra:
        raise MetadataError(f"causal-metadata has unknown fields: {sorted(extra)[:5]!r}")
    latest = rules.latest_hlc(now_ms) if rules else MAX_HLC
    rules = rules or TokenRules()
    deps = check_deps(raw.get("deps", {}), rules, latest)
    if deps and token_bytes(deps) > rules.max_bytes:
        raise MetadataError(
            f"causal-metadata is larger than {rules.max_bytes} bytes (max_token_bytes)"
        )
    return deps


def render_metadata(deps: Mapping[str, Version]) -> dict[str, Any]:
    return {"deps": {key: [v.hlc, v.node] for key, v in deps.items()}} if deps else {}


def merge_deps(*many: Mapping[str, Version]) -> Deps:
    """Per key, the larger version: the union of two causal pasts."""
    out: Deps = {}
    for deps in many:
        for key, version in deps.items():
            if key not in out or version > out[key]:
                out[key] = version
    return out


def deps_to_wire(deps: Mapping[str, Version]) -> dict[str, list[int]]:
    return {key: [v.hlc, v.node] for key, v in deps.items()}


