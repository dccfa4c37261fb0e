"""Peer calls over real sockets: cancelled calls never exhaust the connection pool.

DESIGN.md measured it: a trio cancel scope firing while an httpx request waits for a pool slot
can leave the slot marked busy (encode/httpcore#1093), and under partitions the forwarding pool
runs dry with PoolTimeout.  PeerClient sizes the pool above its limiter so nothing queues.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from trio_kv.transport import PeerClient, PeerUnavailable, real_transport


async def slow(request: Request) -> JSONResponse:
    await trio.sleep(30)
    return JSONResponse({"slow": True})


async def fast(request: Request) -> JSONResponse:
    return JSONResponse({"fast": True})


@pytest.fixture
async def server_address(nursery: trio.Nursery) -> str:
    app = Starlette(routes=[Route("/slow", slow), Route("/fast", fast)])
    cfg = HyperConfig()
    cfg.bind = ["127.0.0.1:0"]
    cfg.accesslog = None
    stop = trio.Event()
    binds = await nursery.start(partial(serve, app, cfg, shutdown_trigger=stop.wait))
    return str(binds[0]).removeprefix("http://")


async def test_cancelled_calls_do_not_exhaust_the_pool(server_address: str) -> None:
    client = PeerClient(real_transport, concurrency=2, connect_timeout=1.0, keepalive_expiry=5.0)
    failures = 0

    async def doomed() -> None:
        nonlocal failures
        try:
            await client.request(server_address, "GET", "/slow", timeout=0.3)
        except PeerUnavailable:
            failures += 1

    with trio.fail_after(20):
        for _ in range(3):  # rounds of 8 callers against 2 slots, all cut off by their deadline
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(doomed)
        assert failures == 24
        # the pool still works: a leak would make these queue until PoolTimeout
        for _ in range(10):
            resp = await client.request(server_address, "GET", "/fast", timeout=2.0)
            assert resp.status == 200 and resp.json() == {"fast": True}
    await client.aclose()


async def test_refused_connection_is_reported_as_refused() -> None:
    client = PeerClient(real_transport, concurrency=2, connect_timeout=1.0, keepalive_expiry=5.0)
    with trio.fail_after(5), pytest.raises(PeerUnavailable) as info:
        await client.request("127.0.0.1:1", "GET", "/", timeout=2.0)
    assert info.value.not_sent
    await client.aclose()
