"""Small client helpers shared by the in-process cluster tests."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from trio_kv.testing import Cluster


async def put(c: httpx.AsyncClient, key: str, value: str, meta: Any = None) -> dict[str, Any]:
    r = await c.put(f"/data/{key}", json={"value": value, "causal-metadata": meta})
    assert r.status_code == 200, r.text
    return dict(r.json()["causal-metadata"])


async def get(c: httpx.AsyncClient, key: str, meta: Any = None) -> httpx.Response:
    return await c.request("GET", f"/data/{key}", json={"causal-metadata": meta})


async def items(cluster: Cluster, node_id: int) -> dict[str, str]:
    async with cluster.client(node_id) as c:
        r = await c.get("/data")
        assert r.status_code == 200, r.text
        return dict(r.json()["items"])


async def converged(cluster: Cluster, node_ids: list[int], within: float = 10.0) -> dict[str, str]:
    """Poll (on the test clock) until every node lists the same items; return them."""
    with trio.fail_after(within):
        while True:
            seen = [await items(cluster, i) for i in node_ids]
            if all(s == seen[0] for s in seen):
                return seen[0]
            await trio.sleep(0.1)


def keys_of(cluster: Cluster, shard: str, count: int = 1, prefix: str = "k") -> list[str]:
    """Keys the cluster's current view places on ``shard``."""
    view = next(iter(cluster.nodes.values())).replica.view
    assert view is not None
    out: list[str] = []
    i = 0
    while len(out) < count:
        key = f"{prefix}{i}"
        if view.shard_for(key) == shard:
            out.append(key)
        i += 1
    return out


async def pending(task_done: trio.Event, for_seconds: float) -> bool:
    """True if ``task_done`` is still unset after ``for_seconds`` (of test-clock time)."""
    with trio.move_on_after(for_seconds):
        await task_done.wait()
    return not task_done.is_set()
