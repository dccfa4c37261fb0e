"""Client causal metadata: the token clients carry between requests.

Shape: ``{"deps": {"<key>": [hlc, node], ...}}`` -- for each key of the client's causal past
whose write has not yet reached every replica of its shard, the version it must see.  Entries
are dropped (pruned) once the write is stable, so the token tracks only recent, unreplicated
writes and never grows with the number of keys in the store.  ``{}`` and ``null`` mean no deps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .clock import Version

Deps = dict[str, Version]


class MetadataError(ValueError):
    """Client metadata is not of the shape this store issues."""


def parse_metadata(raw: object) -> Deps:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MetadataError("causal-metadata must be a JSON object")
    extra = set(raw) - {"deps"}
    if extra:
        raise MetadataError(f"causal-metadata has unknown fields: {sorted(extra)!r}")
    raw_deps = raw.get("deps", {})
    if not isinstance(raw_deps, dict):
        raise MetadataError("causal-metadata 'deps' must be an object")
    deps: Deps = {}
    for key, pair in raw_deps.items():
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(type(x) is int and x >= 0 for x in pair)
        ):
            raise MetadataError("causal-metadata 'deps' entries must be [timestamp, node] pairs")
        deps[key] = Version(pair[0], pair[1])
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


def deps_from_wire(raw: Mapping[str, Iterable[int]]) -> Deps:
    return {key: Version(*pair) for key, pair in raw.items()}
