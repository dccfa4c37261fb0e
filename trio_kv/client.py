"""Clients for trio-kv that carry causality for you: ``Client`` (sync) and ``AsyncClient``.

    with Client(["127.0.0.1:8081", "127.0.0.1:8082"]) as kv:
        kv.put("x", "1")
        kv.get("x")                 # "1", from whichever node answers
        token = kv.session          # hand the session to another client or process
    async with AsyncClient(nodes, session=token) as kv:   # under trio or asyncio (anyio)
        await kv.get("x")           # never misses the write above

Each client keeps its session's causal metadata and sends it with every call, fails over
between the given nodes on connection errors and on 503 (bounded retries, jittered
exponential backoff), and raises typed errors (``trio_kv.errors``).  A write that reached a
node whose answer was lost raises ``OutcomeUnknown`` instead of being sent again elsewhere.
Clients never need the cluster secret; give ``secret=`` only to send views.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import anyio
import httpx

from .client_core import Call, Core, check_session, key_path, parse_nodes
from .errors import (
    BadRequest,
    KeyNotFound,
    OutcomeUnknown,
    ProtocolError,
    TooLarge,
    TrioKVError,
    Unauthorized,
    Unavailable,
)

__all__ = [
    "AsyncClient", "BadRequest", "Client", "KeyNotFound", "OutcomeUnknown", "ProtocolError",
    "TooLarge", "TrioKVError", "Unauthorized", "Unavailable",
]

DEFAULT_TIMEOUT = 40.0  # above the nodes' default 30 s wait deadline: a read may wait that long


class _Base:
    def __init__(
        self,
        nodes: str | Sequence[str],
        *,
        session: Any = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 4,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
        secret: str | None = None,
    ) -> None:
        self._core = Core(nodes, session, retries, backoff, max_backoff, secret)
        self.timeout = timeout

    @property
    def session(self) -> dict[str, Any]:
        """The causal metadata of this session: JSON, to hand to another client."""
        return dict(self._core.session)

    @session.setter
    def session(self, value: Any) -> None:
        self._core.session = check_session(value)

    @property
    def nodes(self) -> list[str]:
        return list(self._core.nodes)

    def _attempts(self, nodes: list[str] | None) -> list[str]:
        order = nodes or self._core.order()
        return [order[i % len(order)] for i in range(self._core.retries + 1)]

    def _answered(self, node: str, pinned: bool) -> None:
        if not pinned:
            self._core.current = self._core.nodes.index(node)

    def _transport_error(self, call: Call, node: str, exc: httpx.TransportError) -> Unavailable:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return Unavailable(f"{node}: cannot connect ({type(exc).__name__})")
        if call.write:
            raise OutcomeUnknown(
                f"{node}: no answer to {call.method} {call.path} ({type(exc).__name__}); the "
                "write may or may not have been applied") from exc
        return Unavailable(f"{node}: no answer ({type(exc).__name__})")

    def _shard_nodes(self, status: dict[str, Any]) -> list[list[str]]:
        """Per shard of a view, its members' addresses, those the client was given first; or,
        when the node that answered routes (no shard), that node alone: it merges every
        shard's pages itself, and the members may not be reachable from here."""
        known = self._core.nodes
        if status.get("shard") is None:
            return [[known[self._core.current]]]
        out = []
        for members in (status.get("view") or {}).values():
            addresses = [m["address"] for m in members]
            out.append(sorted(addresses, key=lambda a: a not in known))
        return out


class Client(_Base):
    """Synchronous client (httpx).  Not for concurrent use from several threads."""

    def __init__(self, nodes: str | Sequence[str], **options: Any) -> None:
        super().__init__(nodes, **options)
        self._http = httpx.Client(timeout=self.timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, call: Call, nodes: list[str] | None = None) -> Any:
        core = self._core
        last: TrioKVError = Unavailable("no node tried")
        for attempt, node in enumerate(self._attempts(nodes)):
            if attempt:
                time.sleep(core.delay(attempt))
            sent = core.session
            method, url, headers, content = core.request(call, node)
            try:
                resp = self._http.request(method, url, headers=headers, content=content,
                                          params=call.query)
            except httpx.TransportError as exc:
                last = self._transport_error(call, node, exc)
                continue
            try:
                answer = core.interpret(call, resp.status_code, resp.content, sent)
            except TrioKVError as exc:
                if not core.retryable(call, exc):
                    raise
                last = exc
                continue
            self._answered(node, nodes is not None)
            return answer
        raise last

    def get(self, key: str) -> str:
        """The key's value; ``KeyNotFound`` if it does not exist."""
        body = self._call(Call("GET", key_path(key), key=key))
        value = body.get("value") if isinstance(body, dict) else None
        if not isinstance(value, str):
            raise ProtocolError("GET answered without a string value", 200, body)
        return value

    def put(self, key: str, value: str) -> None:
        if not isinstance(value, str):
            raise BadRequest("a value is a string")
        self._call(Call("PUT", key_path(key), key=key, value=value, write=True))

    def delete(self, key: str) -> None:
        """Delete the key; ``KeyNotFound`` if it did not exist."""
        self._call(Call("DELETE", key_path(key), key=key, write=True))

    def view(self) -> dict[str, Any]:
        """``GET /view`` of the first node that answers."""
        return dict(self._call(Call("GET", "/view", sessionless=True)))

    def put_view(self, view: dict[str, Any]) -> None:
        """Send a view (``{"view": {...}}``) to every node it names."""
        for members in view["view"].values() if isinstance(view["view"], dict) else [view["view"]]:
            for member in members:
                self._call(Call("PUT", "/view", body=view, sessionless=True),
                           parse_nodes([member["address"]]))

    def status(self) -> list[dict[str, Any]]:
        """Each given node's id, shard, view, epoch, key count and change state, or its error."""
        out = []
        for node in self._core.nodes:
            try:
                out.append({"node": node, **self._call(Call("GET", "/view", sessionless=True),
                                                       [node])})
            except TrioKVError as exc:
                out.append({"node": node, "error": str(exc)})
        return out

    def page(self, after: str = "", limit: int = 1000,
             node: str | None = None) -> tuple[dict[str, str], str | None]:
        """One page of ``GET /data`` (of the node's shard) and the cursor of the next."""
        body = self._call(Call("GET", "/data", query={"limit": limit, "after": after}),
                          [node] if node else None)
        return dict(body["items"]), body.get("next")

    def items(self, page_size: int = 1000) -> dict[str, str]:
        """Every live key of the store, paged shard by shard, in the session's causal view."""
        status = self.view()
        if not status.get("view"):
            raise Unavailable("the cluster has no view yet")
        out: dict[str, str] = {}
        for members in self._shard_nodes(status):
            after: str | None = ""
            while after is not None:
                body = self._call(Call("GET", "/data", query={"limit": page_size,
                                                              "after": after}), members)
                out.update(body["items"])
                after = body.get("next")
        return out


class AsyncClient(_Base):
    """Asynchronous client (httpx + anyio): works under trio and under asyncio."""

    def __init__(self, nodes: str | Sequence[str], *,
                 transport: httpx.AsyncBaseTransport | None = None, **options: Any) -> None:
        super().__init__(nodes, **options)
        self._http = httpx.AsyncClient(timeout=self.timeout, transport=transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, call: Call, nodes: list[str] | None = None) -> Any:
        core = self._core
        last: TrioKVError = Unavailable("no node tried")
        for attempt, node in enumerate(self._attempts(nodes)):
            if attempt:
                await anyio.sleep(core.delay(attempt))
            sent = core.session
            method, url, headers, content = core.request(call, node)
            try:
                resp = await self._http.request(method, url, headers=headers, content=content,
                                                params=call.query)
            except httpx.TransportError as exc:
                last = self._transport_error(call, node, exc)
                continue
            try:
                answer = core.interpret(call, resp.status_code, resp.content, sent)
            except TrioKVError as exc:
                if not core.retryable(call, exc):
                    raise
                last = exc
                continue
            self._answered(node, nodes is not None)
            return answer
        raise last

    async def get(self, key: str) -> str:
        body = await self._call(Call("GET", key_path(key), key=key))
        value = body.get("value") if isinstance(body, dict) else None
        if not isinstance(value, str):
            raise ProtocolError("GET answered without a string value", 200, body)
        return value

    async def put(self, key: str, value: str) -> None:
        if not isinstance(value, str):
            raise BadRequest("a value is a string")
        await self._call(Call("PUT", key_path(key), key=key, value=value, write=True))

    async def delete(self, key: str) -> None:
        await self._call(Call("DELETE", key_path(key), key=key, write=True))

    async def view(self) -> dict[str, Any]:
        return dict(await self._call(Call("GET", "/view", sessionless=True)))

    async def put_view(self, view: dict[str, Any]) -> None:
        members = view["view"].values() if isinstance(view["view"], dict) else [view["view"]]
        async with anyio.create_task_group() as tg:
            for shard in members:
                for member in shard:
                    tg.start_soon(self._call, Call("PUT", "/view", body=view, sessionless=True),
                                  parse_nodes([member["address"]]))

    async def page(self, after: str = "", limit: int = 1000,
                   node: str | None = None) -> tuple[dict[str, str], str | None]:
        body = await self._call(Call("GET", "/data", query={"limit": limit, "after": after}),
                                [node] if node else None)
        return dict(body["items"]), body.get("next")

    async def items(self, page_size: int = 1000) -> dict[str, str]:
        status = await self.view()
        if not status.get("view"):
            raise Unavailable("the cluster has no view yet")
        out: dict[str, str] = {}
        for members in self._shard_nodes(status):
            after: str | None = ""
            while after is not None:
                body = await self._call(Call("GET", "/data", query={"limit": page_size,
                                                                    "after": after}), members)
                out.update(body["items"])
                after = body.get("next")
        return out
