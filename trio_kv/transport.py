"""Peer calls: injected ``httpx.AsyncClient``s (one pool per peer), every call bounded.

ASGITransport (tests) ignores httpx timeouts, and a DROP partition can hold a connection
forever, so every call also sits in a trio cancel scope.  The client's pool is larger than the
limiter lets in flight, so no request ever queues for a pool slot: a request cancelled while
queued can leak its slot in httpcore (encode/httpcore#1093) and exhaust the pool under
partitions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from .messages import dumps, loads

log = logging.getLogger("trio_kv.transport")

SECRET_HEADER = "x-kv-secret"

ClientFactory = Callable[[httpx.Limits, httpx.Timeout], httpx.AsyncClient]


def real_client(limits: httpx.Limits, timeout: httpx.Timeout) -> httpx.AsyncClient:
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)


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

    def __init__(self, address: str, reason: str, not_sent: bool = False) -> None:
        super().__init__(f"{address}: {reason}")
        self.not_sent = not_sent


class PeerClient:
    def __init__(
        self,
        factory: ClientFactory,
        concurrency: int,
        connect_timeout: float,
        keepalive_expiry: float,
        secret: str = "",
    ) -> None:
        self.limiter = trio.CapacityLimiter(concurrency)
        self._factory = factory
        self._limits = httpx.Limits(
            max_connections=concurrency * 2 + 8,
            max_keepalive_connections=concurrency + 4,
            keepalive_expiry=keepalive_expiry,
        )
        self._timeout = httpx.Timeout(30.0, connect=connect_timeout)
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._headers = {SECRET_HEADER: secret} if secret else {}

    def _client_for(self, address: str) -> httpx.AsyncClient:
        """One pool per peer: httpcore scans every pooled connection on each request, so a
        shared pool's cost grows with the number of peers (measured: ~10% of a forwarding
        node's CPU in ``has_expired``)."""
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = self._factory(self._limits, self._timeout)
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

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
        if content is not None:
            hdrs.setdefault("content-type", "application/json")
        url = f"http://{address}{path}"
        # Each call is its own borrower: in-process (ASGITransport) a forwarded request that
        # comes back to this node runs in the same task as the call that sent it.
        borrower = object()
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
            except (httpx.TransportError, OSError) as exc:
                raise PeerUnavailable(address, f"{type(exc).__name__}: {exc}") from exc
            finally:
                self.limiter.release_on_behalf_of(borrower)
        raise PeerUnavailable(address, f"no answer within {timeout:.1f}s")

    async def _send(
        self, address: str, method: str, url: str, content: bytes | None,
        headers: dict[str, str], timeout: float,
    ) -> PeerResponse:
        resp = await self._client_for(address).request(
            method, url, content=content, headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 1.0)),
        )
        return PeerResponse(resp.status_code, resp.content, resp.headers.get("content-type", ""))

    async def post_json(self, address: str, path: str, payload: Any, timeout: float) -> Any:
        """POST a peer message; the decoded JSON answer, or PeerUnavailable."""
        resp = await self.request(address, "POST", path, content=dumps(payload), timeout=timeout)
        if resp.status != 200:
            raise PeerUnavailable(address, f"{path} answered {resp.status}")
        try:
            return resp.json()
        except ValueError as exc:
            raise PeerUnavailable(address, f"{path} answered malformed JSON") from exc
