"""Running a node as a process: hypercorn in the node's nursery, clean shutdown on signals."""

from __future__ import annotations

import gc
import logging
import signal
from typing import Any

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
    hcfg = HyperConfig()
    hcfg.bind = [f"{config.host}:{config.port}"]
    hcfg.keep_alive_timeout = config.keep_alive_timeout
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


async def _serve_http(
    app: Any,
    hcfg: Any,
    stop: trio.Event,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    import hypercorn.trio

    try:
        await hypercorn.trio.serve(app, hcfg, shutdown_trigger=stop.wait, task_status=task_status)
    finally:
        done.set()


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            log.info("received %s: shutting down", signal.Signals(sig).name)
            stop.set()
            return

