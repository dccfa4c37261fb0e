"""A deliberately naive stand-in node, only for testing the harness itself (`--node-cmd`).

It serves enough of API.md for every scenario to run (views, data routes, forwarding,
push replication, handoff on view change) on the same stack as the real node, with none
of its guarantees: no causal waits, LWW on (counter, id), rendezvous hashing. Never use its
figures as the node's; the suite labels every run with the node command it measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from functools import partial
from typing import Any

import httpx
import trio
from ceiling_app import serve_until_signal  # bench/ is the script's directory
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

Item = tuple[str | None, int, int]  # value (None = tombstone), counter, node id


class Stub:
    """All of the stub's state; one per process."""

    def __init__(self, node_id: int) -> None:
        self.id = node_id
        self.view: dict[str, list[dict[str, Any]]] = {}
        self.shard: str | None = None
        self.store: dict[str, Item] = {}
        self.counter = 0
        self.dirty: dict[str, set[str]] = {}
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(5.0, connect=1.0),
            trust_env=False,
            limits=httpx.Limits(max_connections=32),
        )

    def owner(self, key: str) -> str:
        return max(self.view, key=lambda s: hashlib.blake2b(f"{s}\0{key}".encode()).digest())

    def peers(self) -> list[str]:
        if self.shard is None:
            return []
        return [m["address"] for m in self.view[self.shard] if int(m["id"]) != self.id]

    def apply(self, key: str, item: Item) -> None:
        cur = self.store.get(key)
        if cur is None or (item[1], item[2]) > (cur[1], cur[2]):
            self.store[key] = item
            self.counter = max(self.counter, item[1])

    def write(self, key: str, value: str | None) -> None:
        self.counter += 1
        self.store[key] = (value, self.counter, self.id)
        for p in self.peers():
            self.dirty.setdefault(p, set()).add(key)

    async def replicate(self) -> None:
        while True:
            await trio.sleep(0.2)
            for peer in self.peers():
                keys = self.dirty.get(peer)
                if not keys:
                    continue
                batch = list(keys)[:5000]
                items = {k: self.store[k] for k in batch if k in self.store}
                try:
                    with trio.move_on_after(3):
                        r = await self.client.post(
                            f"http://{peer}/internal/sync", json={"items": items}
                        )
                        if r.status_code == 200:
                            keys.difference_update(batch)
                except httpx.HTTPError:
                    pass


S: Stub


def err(msg: str, code: int, **extra: Any) -> Response:
    return JSONResponse({"error": msg, **extra}, status_code=code)


async def ping(request: Request) -> Response:
    return JSONResponse({"ok": True, "id": S.id})


async def get_view(request: Request) -> Response:
    return JSONResponse({"view": S.view, "id": S.id, "shard": S.shard})


async def put_view(request: Request) -> Response:
    try:
        view = (await request.json())["view"]
    except (ValueError, KeyError, TypeError):
        return err("bad view", 400)
    if isinstance(view, list):
        view = {"s1": view}
    if view == S.view:
        return JSONResponse({"ok": True})
    S.view = view
    S.shard = next((s for s, ms in view.items() if any(int(m["id"]) == S.id for m in ms)), None)
    S.dirty = {}
    moving: dict[str, dict[str, Item]] = {}
    for k, item in S.store.items():
        s = S.owner(k)
        if s != S.shard:
            moving.setdefault(s, {})[k] = item
    for s, items in moving.items():
        for m in view[s]:
            ks = list(items)
            for i in range(0, len(ks), 5000):
                chunk = {k: items[k] for k in ks[i : i + 5000]}
                r = await S.client.post(
                    f"http://{m['address']}/internal/sync", json={"items": chunk}, timeout=30
                )
                r.raise_for_status()
        for k in items:
            del S.store[k]
    return JSONResponse({"ok": True})


async def sync(request: Request) -> Response:
    for k, item in (await request.json())["items"].items():
        S.apply(k, (item[0], int(item[1]), int(item[2])))
    return JSONResponse({"ok": True})


async def forward(request: Request, shard: str, body: bytes) -> Response:
    headers = {"content-type": "application/json"}
    if "x-causal-metadata" in request.headers:
        headers["x-causal-metadata"] = request.headers["x-causal-metadata"]
    for m in S.view[shard]:
        try:
            r = await S.client.request(
                request.method,
                f"http://{m['address']}{request.url.path}",
                content=body,
                headers=headers,
            )
        except httpx.HTTPError:
            continue
        return Response(r.content, r.status_code, media_type="application/json")
    return err(f"shard {shard} unreachable", 503)


async def data_key(request: Request) -> Response:
    if not S.view or S.shard is None:
        return err("no view", 503)
    key = request.path_params["key"]
    body = await request.body()
    shard = S.owner(key)
    if shard != S.shard:
        return await forward(request, shard, body)
    meta: dict[str, Any] = {}
    if request.method == "PUT":
        try:
            data = json.loads(body)
            value = data["value"]
            assert isinstance(value, str)
        except (ValueError, KeyError, TypeError, AssertionError):
            return err("bad body", 400)
        S.write(key, value)
        return JSONResponse({"causal-metadata": meta})
    item = S.store.get(key)
    if item is None or item[0] is None:
        return err("not found", 404, **{"causal-metadata": meta})
    if request.method == "DELETE":
        S.write(key, None)
        return JSONResponse({"causal-metadata": meta})
    return JSONResponse({"value": item[0], "causal-metadata": meta})


async def data_all(request: Request) -> Response:
    if not S.view or S.shard is None:
        return err("no view", 503)
    items = {k: v[0] for k, v in S.store.items() if v[0] is not None}
    return JSONResponse({"items": items, "causal-metadata": {}})


async def main(node_id: int, host: str, port: int) -> None:
    global S
    S = Stub(node_id)
    app = Starlette(
        routes=[
            Route("/ping", ping),
            Route("/view", get_view, methods=["GET"]),
            Route("/view", put_view, methods=["PUT"]),
            Route("/internal/sync", sync, methods=["POST"]),
            Route("/data", data_all, methods=["GET"]),
            Route("/data/{key}", data_key, methods=["GET", "PUT", "DELETE"]),
        ]
    )
    await serve_until_signal(app, host, port, S.replicate)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--id", type=int, default=int(os.environ.get("NODE_IDENTIFIER", "1")))
    ap.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8081")))
    a = ap.parse_args()
    trio.run(partial(main, a.id, a.host, a.port))
