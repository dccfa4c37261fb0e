"""Running a node as a process: hypercorn in the node's nursery, clean shutdown on signals."""

from __future__ import annotations

import gc
import ipaddress
import logging
import signal
from typing import Any

import h11
import orjson
import trio

from .config import Config
from .node import Node

log = logging.getLogger("trio_kv.node")


async def serve(config: Config) -> None:
    """Run a node with hypercorn until SIGTERM/SIGINT, then shut down cleanly."""
    from hypercorn.config import Config as HyperConfig

    from .api import build_app

    if config.gc_gen0_threshold > 0:
        gc.freeze()  # what startup made lives for good: no collection needs to scan it again
        _gen0, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(config.gc_gen0_threshold, gen1, gen2)
    node = Node(config)
    if not config.cluster_secret and not _loopback(config.host):
        log.warning(
            "node %s listens on %s with no cluster secret: anyone who reaches this port can send "
            "views and peer messages; set KV_CLUSTER_SECRET on every node", config.node_id,
            config.host,
        )
    _json_protocol_errors()
    hcfg = HyperConfig()
    hcfg.bind = [f"{config.host}:{config.port}"]
    # An idle connection, or one that sent half a request head, closes after keep_alive_timeout;
    # a half-sent body is bounded by read_timeout in api.py.  hypercorn's own read timeout
    # would also cut a request still being answered, so it is only a backstop above the
    # longest answer (a causal wait, or a PUT /view).
    hcfg.keep_alive_timeout = config.keep_alive_timeout
    hcfg.read_timeout = int(config.connection_read_timeout)  # type: ignore[assignment,unused-ignore]
    hcfg.graceful_timeout = config.shutdown_grace
    hcfg.h11_max_incomplete_size = config.max_header_bytes
    hcfg.accesslog = None
    hcfg.errorlog = logging.getLogger("hypercorn.error")
    stop = trio.Event()
    http_done = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        nursery.start_soon(_stop_on_signal, stop)
        binds = await nursery.start(_serve_http, build_app(node), hcfg, stop, http_done)
        log.info("node %s listening on %s", config.node_id, ", ".join(binds))
        await http_done.wait()  # hypercorn returns once stopped and drained (graceful_timeout)
        nursery.cancel_scope.cancel()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


_PROTOCOL_ERRORS = {
    431: "request head larger than max_header_bytes",
    400: "malformed HTTP request",
}


def _json_protocol_errors() -> None:
    """hypercorn answers a request it cannot parse (a head over ``h11_max_incomplete_size``:
    431; garbage: 400) with an empty body.  Every error of ours is JSON, so these are too."""
    from hypercorn.protocol.h11 import H11Protocol

    async def send_error_response(self: Any, status_code: int) -> None:
        body = orjson.dumps({"error": _PROTOCOL_ERRORS.get(status_code, "malformed request")})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    H11Protocol._send_error_response = send_error_response  # type: ignore[method-assign]


async def _serve_http(
    app: Any,
    hcfg: Any,
    stop: trio.Event,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    from .listener import serve as serve_node_port

    try:
        await serve_node_port(app, hcfg, app.state.serve_channel, shutdown_trigger=stop.wait,
                              task_status=task_status)
    finally:
        done.set()


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            log.info("received %s: shutting down", signal.Signals(sig).name)
            stop.set()
            return

