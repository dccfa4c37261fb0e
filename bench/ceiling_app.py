"""The bare-stack ceiling: the least a hypercorn-trio-starlette server can do per request.

It serves the same routes and shapes as a node (GET and JSON PUT on /data/<key>, /ping) with
no logic beyond a dict, under the same server configuration as the node (hypercorn's trio
worker, no access log, long keep-alive). The suite measures it in every run and reports the
node's figures as ratios to it, because absolute figures on shared 2-core machines drift.
"""

from __future__ import annotations

import argparse
import json
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

STORE: dict[str, str] = {}
EMPTY_META: dict[str, object] = {}


async def ping(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def get_key(request: Request) -> Response:
    key = request.path_params["key"]
    # Read the header like a node would, so the ceiling pays the same parsing.
    raw = request.headers.get("x-causal-metadata")
    meta = json.loads(raw) if raw else EMPTY_META
    if key in STORE:
        return JSONResponse({"value": STORE[key], "causal-metadata": meta})
    return JSONResponse({"error": "key not found", "causal-metadata": meta}, status_code=404)


async def put_key(request: Request) -> Response:
    body = await request.body()
    try:
        data = json.loads(body)
    except ValueError:
        return JSONResponse({"error": "body is not JSON"}, status_code=400)
    if not isinstance(data, dict) or not isinstance(data.get("value"), str):
        return JSONResponse({"error": "value missing or not a string"}, status_code=400)
    STORE[request.path_params["key"]] = data["value"]
    return JSONResponse({"causal-metadata": data.get("causal-metadata") or EMPTY_META})


app = Starlette(
    routes=[
        Route("/ping", ping, methods=["GET"]),
        Route("/data/{key}", get_key, methods=["GET"]),
        Route("/data/{key}", put_key, methods=["PUT"]),
    ]
)


async def serve_until_signal(
    asgi_app: Any, host: str, port: int, *background: Callable[[], Awaitable[None]]
) -> None:
    """Serve like the node does (hypercorn trio worker, no access log, 30 s keep-alive) until
    SIGTERM/SIGINT, with optional background tasks beside the server."""
    cfg = Config()
    cfg.bind = [f"{host}:{port}"]
    cfg.accesslog = None
    cfg.keep_alive_timeout = 30
    stop = trio.Event()

    async def on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for _ in sigs:
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signal)
        for task in background:
            nursery.start_soon(task)
        await serve(asgi_app, cfg, shutdown_trigger=stop.wait)
        nursery.cancel_scope.cancel()


async def main(host: str, port: int) -> None:
    await serve_until_signal(app, host, port)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8090)
    a = ap.parse_args()
    trio.run(partial(main, a.host, a.port))
