"""Peer calls: injected httpx transports (one pool per peer), every call bounded.

We call the transport, not an ``httpx.AsyncClient``: peers need none of the client's
cookies, auth, redirects or URL merging, and skipping them cuts httpx's CPU per call by about
a third (measured: 320 -> 230 us per GET against a fixed-reply server), which is most of what
a forwarded request costs on top of two local ones.

ASGITransport (tests) ignores httpx timeouts, and a DROP partition can hold a connection
forever, so every call also sits in a trio cancel scope.  The pool is larger than the limiter
lets in flight, so no request ever queues for a pool slot: a request cancelled while queued
can leak its slot in httpcore (encode/httpcore#1093) and exhaust the pool under partitions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from .messages import dumps, loads
from .observe import REQUEST_ID, REQUEST_ID_HEADER

log = logging.getLogger("trio_kv.transport")

SECRET_HEADER = "x-kv-secret"

TransportFactory = Callable[[httpx.Limits], httpx.AsyncBaseTransport]


def real_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    # Peer URLs are plain http:// (``call`` builds them), so no TLS context is ever used;
    # building the default one costs 20-80 ms of CPU per peer pool, which a first view on
    # fresh nodes paid (each node opens a pool per peer while asking them for their view).
    return httpx.AsyncHTTPTransport(limits=limits, retries=0, verify=False)


def route_of(path: str) -> str:
    """A bounded label for a peer call's path: ``/data/<key>`` is ``/data/{key}``."""
    if path.startswith("/data/"):
        return "/data/{key}"
    return path.split("?", 1)[0]


@dataclass(slots=True)
class PeerStats:
    """Per route of peer calls: calls made, failures, bytes each way (read by /metrics)."""

    calls: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)
    bytes_received: dict[str, int] = field(default_factory=dict)

    def add(self, table: dict[str, int], route: str, n: int = 1) -> None:
        table[route] = table.get(route, 0) + n


@dataclass(frozen=True, slots=True)
class PeerResponse:
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return loads(self.body)


class PeerUnavailable(Exception):
    """The peer could not be reached or did not answer in time.

    ``not_sent`` is True only when the request provably never reached the peer (the
    connection was refused or never established); otherwise it may have been applied.
    """

    def __init__(
        self, address: str, reason: str, not_sent: bool = False, status: int | None = None
    ) -> None:
        super().__init__(f"{address}: {reason}")
        self.not_sent = not_sent
        # The peer answered, with this unexpected status; 413 (ours or theirs) means "smaller".
        self.status = status

    @property
    def too_large(self) -> bool:
        return self.status == 413


class PeerCaller:
    """What the node calls peers through: over HTTP (``PeerClient``) or over a persistent
    channel (``channel.ChannelClient``); both bound every call the same way."""

    def __init__(self, concurrency: int) -> None:
        self.limiter = trio.CapacityLimiter(concurrency)
        self.stats = PeerStats()

    def start(self, nursery: trio.Nursery) -> None:
        """Background work (a channel's readers) runs in the node's nursery."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def request(
        self,
        address: str,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float,
    ) -> PeerResponse:
        raise NotImplementedError

    async def post_json(self, address: str, path: str, payload: Any, timeout: float) -> Any:
        """POST a peer message; the decoded JSON answer, or PeerUnavailable."""
        resp = await self.request(address, "POST", path, content=dumps(payload), timeout=timeout)
        if resp.status != 200:
            raise PeerUnavailable(
                address, f"{path} answered {resp.status}: {resp.body[:200]!r}", status=resp.status
            )
        try:
            return resp.json()
        except ValueError as exc:
            raise PeerUnavailable(address, f"{path} answered malformed JSON") from exc


class PeerClient(PeerCaller):
    def __init__(
        self,
        factory: TransportFactory,
        concurrency: int,
        connect_timeout: float,
        keepalive_expiry: float,
        secret: str = "",
        max_answer_bytes: int = 16 << 20,
    ) -> None:
        super().__init__(concurrency)
        self._max_answer = max_answer_bytes
        self._factory = factory
        self._limits = httpx.Limits(
            max_connections=concurrency * 2 + 8,
            max_keepalive_connections=concurrency + 4,
            keepalive_expiry=keepalive_expiry,
        )
        self._connect_timeout = connect_timeout
        self._pools: dict[str, httpx.AsyncBaseTransport] = {}
        self._headers = {SECRET_HEADER: secret} if secret else {}

    def _pool_for(self, address: str) -> httpx.AsyncBaseTransport:
        """One pool per peer: httpcore scans every pooled connection on each request, so a
        shared pool's cost grows with the number of peers (measured: ~10% of a forwarding
        node's CPU in ``has_expired``)."""
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = self._factory(self._limits)
        return pool

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()

    async def request(
        self,
        address: str,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float,
    ) -> PeerResponse:
        """One call to ``address``, bounded by ``timeout`` seconds in all; retried once if a
        kept-alive connection was closed under us (the request never reached the app)."""
        hdrs = {**self._headers, **(headers or {})}
        if (request_id := REQUEST_ID.get()) is not None:
            hdrs[REQUEST_ID_HEADER] = request_id  # one id follows a request through nodes
        if content is not None:
            hdrs.setdefault("content-type", "application/json")
        url = f"http://{address}{path}"
        # Each call is its own borrower: in-process (ASGITransport) a forwarded request that
        # comes back to this node runs in the same task as the call that sent it.
        borrower = object()
        stats, route = self.stats, route_of(path)
        stats.add(stats.calls, route)
        if content:
            stats.add(stats.bytes_sent, route, len(content))
        try:
            resp = await self._request(address, method, url, content, hdrs, timeout, borrower)
        except PeerUnavailable:
            stats.add(stats.failures, route)
            raise
        stats.add(stats.bytes_received, route, len(resp.body))
        return resp

    async def _request(
        self, address: str, method: str, url: str, content: bytes | None,
        hdrs: dict[str, str], timeout: float, borrower: object,
    ) -> PeerResponse:
        with trio.move_on_after(timeout):
            await self.limiter.acquire_on_behalf_of(borrower)
            try:
                try:
                    return await self._send(address, method, url, content, hdrs, timeout)
                except httpx.RemoteProtocolError:
                    return await self._send(address, method, url, content, hdrs, timeout)
            except httpx.RemoteProtocolError as exc:
                raise PeerUnavailable(address, str(exc)) from exc
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise PeerUnavailable(address, f"connect failed: {exc!r}", True) from exc
            except (httpx.HTTPError, OSError) as exc:
                raise PeerUnavailable(address, f"{type(exc).__name__}: {exc}") from exc
            finally:
                self.limiter.release_on_behalf_of(borrower)
        raise PeerUnavailable(address, f"no answer within {timeout:.1f}s")

    async def _send(
        self, address: str, method: str, url: str, content: bytes | None,
        headers: dict[str, str], timeout: float,
    ) -> PeerResponse:
        connect = min(timeout, self._connect_timeout)
        request = httpx.Request(
            method, url, content=content, headers=headers,
            extensions={"timeout": {"connect": connect, "read": timeout, "write": timeout,
                                    "pool": timeout}},
        )
        resp = await self._pool_for(address).handle_async_request(request)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in resp.aiter_raw():
                size += len(chunk)
                if size > self._max_answer:
                    raise PeerUnavailable(address, f"answer larger than {self._max_answer} "
                                          "bytes (max_peer_message_bytes)", status=413)
                chunks.append(chunk)
        finally:
            await resp.aclose()
        content_type = resp.headers.get("content-type", "")
        return PeerResponse(resp.status_code, b"".join(chunks), content_type)
