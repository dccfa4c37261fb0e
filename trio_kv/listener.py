"""The node's one port: HTTP for everyone, and the peer channel for peers.

Every connection starts with a look at its first bytes.  A peer opening the channel sends
``PREFACE`` (not an HTTP request line), and the connection is served by
``channel_server.serve_channel`` as raw length-prefixed messages; anything else is handed,
bytes already read included, to hypercorn's own per-connection server, exactly as
``hypercorn.trio.serve`` would.  The view keeps one address per node, and deployments,
firewall rules and partitions see one port, while peer calls skip HTTP and WebSocket framing
(measured: a channel round trip cost 310 us over hypercorn's WebSocket path).

This is ``hypercorn.trio.run.worker_serve`` minus what a node never uses (TLS, QUIC, statsd,
``max_requests``), with hypercorn's ``TCPServer`` for HTTP; pyproject pins hypercorn to the
release line it was written against.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from .channel_server import ChannelServer
from .frames import PREFACE, RECEIVE_BYTES

log = logging.getLogger("trio_kv.node")

class _Replay(trio.abc.HalfCloseableStream):
    """A socket stream whose first bytes (read while sniffing) are read again."""

    def __init__(self, stream: trio.SocketStream, first: bytes) -> None:
        self.socket = stream.socket  # hypercorn reads the peer's address from it
        self._stream = stream
        self._first = first
        # Every request passes here twice: call the socket stream with no frame in between.
        self.send_all = stream.send_all  # type: ignore[method-assign]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._first:
            await trio.lowlevel.checkpoint()  # before taking them: a cancel here loses nothing
            first, self._first = self._first, b""
            self.receive_some = self._stream.receive_some  # type: ignore[method-assign]
            return first
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _sniff(stream: trio.SocketStream, timeout: float) -> bytes | None:
    """The first bytes, enough to tell the preface from HTTP; None: closed or silent."""
    first = b""
    with trio.move_on_after(timeout):
        while len(first) < len(PREFACE) and PREFACE.startswith(first):
            try:
                data = await stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return None
            if not data:
                return first or None
            first += data
        return first
    return first or None  # a partial head that stalled: hypercorn times it out as HTTP does


async def _connection(
    app: Any, hcfg: HyperConfig, context: WorkerContext, state: dict[str, Any],
    channel: ChannelServer, sniffing: set[trio.CancelScope], stream: trio.SocketStream,
) -> None:
    first = None
    with trio.CancelScope() as scope:  # shutting down cancels it: a silent socket must not
        sniffing.add(scope)            # hold the node for its whole grace period
        try:
            first = await _sniff(stream, hcfg.keep_alive_timeout)
        finally:
            sniffing.discard(scope)
    if first is None:
        await stream.aclose()
    elif first.startswith(PREFACE):
        try:
            await channel(stream, first[len(PREFACE):], context.terminated)
        except Exception:  # a bug must cost one channel, never the node's listener
            log.exception("peer channel failed")
            stream.socket.close()
    else:
        await TCPServer(app, hcfg, context, ConnectionState(state.copy()),
                        _Replay(stream, first))  # type: ignore[arg-type]


async def serve(
    asgi_app: Any,
    hcfg: HyperConfig,
    channel: ChannelServer,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP and the peer channel on ``hcfg.bind`` until ``shutdown_trigger`` returns,
    then drain for at most ``hcfg.graceful_timeout``, as hypercorn does."""
    app = wrap_app(asgi_app, hcfg.wsgi_max_body_size, "asgi")
    state: dict[str, Any] = {}
    sniffing: set[trio.CancelScope] = set()
    lifespan = Lifespan(app, hcfg, state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:
            sockets = hcfg.create_sockets()
            listeners = []
            binds = []
            for sock in sockets.insecure_sockets:
                sock.listen(hcfg.backlog)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            task_status.started(binds)
            try:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(partial(
                        trio.serve_listeners,
                        partial(_connection, app, hcfg, context, state, channel, sniffing),
                        listeners, handler_nursery=connections,
                    ))
                    await shutdown_trigger()
                    accepting.cancel_scope.cancel()
            finally:
                await context.terminated.set()
                for scope in sniffing:
                    scope.cancel()
                connections.cancel_scope.deadline = trio.current_time() + hcfg.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
