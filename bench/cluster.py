"""A cluster of node processes driven only through the public HTTP contract (API.md).

Nothing here imports trio_kv: key ownership, for instance, is learned by asking each shard
for its items (`GET /data`), so the suite measures any node that serves API.md.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import procs
from httpc import HTTPError, Response, request
from procs import Proc


@dataclass
class Settings:
    """What every cluster needs to start its processes."""

    node_cmd: str
    python: str
    logdir: Path
    env: dict[str, str]


class Cluster:
    """Node processes plus the view the harness last gave them."""

    def __init__(self, settings: Settings, nodes: list[Proc]) -> None:
        self.settings = settings
        self.nodes = nodes
        self.view: dict[str, list[Proc]] = {}

    @classmethod
    async def start(cls, settings: Settings, n: int, first_id: int = 1) -> Cluster:
        ports = procs.free_ports(n)
        nodes = [
            procs.start_node(
                first_id + i,
                ports[i],
                settings.node_cmd,
                settings.python,
                settings.logdir,
                settings.env,
            )
            for i in range(n)
        ]
        try:
            await procs.wait_ready(nodes)
        except BaseException:
            procs.stop(nodes)
            raise
        return cls(settings, nodes)

    async def add_nodes(self, n: int) -> list[Proc]:
        """Start n more nodes (ids continue after the highest one) and wait for /ping."""
        first = max(p.node_id for p in self.nodes) + 1
        ports = procs.free_ports(n)
        new = [
            procs.start_node(
                first + i,
                ports[i],
                self.settings.node_cmd,
                self.settings.python,
                self.settings.logdir,
                self.settings.env,
            )
            for i in range(n)
        ]
        self.nodes += new
        await procs.wait_ready(new)
        return new

    def stop(self) -> None:
        procs.stop(self.nodes)

    def layout(self, shards: int, replicas: int) -> dict[str, list[Proc]]:
        """The first shards*replicas nodes, shard-major: s1 = n1..nR, s2 = ..."""
        assert shards * replicas <= len(self.nodes)
        return {f"s{s + 1}": self.nodes[s * replicas : (s + 1) * replicas] for s in range(shards)}

    @staticmethod
    def view_body(view: dict[str, list[Proc]]) -> dict[str, Any]:
        return {
            "view": {
                name: [{"address": p.addr, "id": p.node_id} for p in members]
                for name, members in view.items()
            }
        }

    async def set_view(
        self, view: dict[str, list[Proc]], targets: list[Proc] | None = None, timeout: float = 60.0
    ) -> dict[str, float]:
        """PUT /view to every target at once; returns seconds until each answered 200.

        Targets default to the new members plus every node of the old view (a node leaving
        must be told, so it hands off). Raises if any answer is not 200.
        """
        body = self.view_body(view)
        if targets is None:
            members = [p for ps in view.values() for p in ps]
            old = [p for ps in self.view.values() for p in ps if p not in members]
            targets = members + old
        t0 = time.monotonic()
        done: dict[str, float] = {}

        async def one(p: Proc) -> Response:
            r = await request(p.addr, "PUT", "/view", body, timeout=timeout)
            done[p.name] = time.monotonic() - t0
            return r

        results = await asyncio.gather(*(one(p) for p in targets), return_exceptions=True)
        bad = [
            f"{p.name}: {r!r}"
            if isinstance(r, BaseException)
            else f"{p.name}: {r.status} {r.body[:200]!r}"
            for p, r in zip(targets, results, strict=True)
            if isinstance(r, BaseException) or r.status != 200
        ]
        if bad:
            raise RuntimeError("PUT /view failed: " + "; ".join(bad))
        self.view = view
        return done

    async def items(self, node: Proc, timeout: float = 60.0) -> dict[str, str]:
        """`GET /data` on one node: every live key of that node's shard."""
        r = await request(node.addr, "GET", "/data", timeout=timeout)
        if r.status != 200:
            raise RuntimeError(f"GET /data on {node.name}: {r.status} {r.body[:200]!r}")
        data = r.json()
        items = data.get("items", {})
        if not isinstance(items, dict):
            raise RuntimeError(f"GET /data on {node.name}: items is not an object")
        return items

    async def key_owners(self) -> dict[str, str]:
        """key -> shard name, from one replica of each shard (its `GET /data`)."""
        owners: dict[str, str] = {}
        for name, members in self.view.items():
            for key in await self.items(members[0]):
                owners[key] = name
        return owners


async def try_get(addr: str, path: str, timeout: float = 5.0) -> Response | None:
    """A GET that answers None instead of raising (used by polling loops)."""
    try:
        return await request(addr, "GET", path, timeout=timeout)
    except HTTPError:
        return None
