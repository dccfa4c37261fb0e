"""HTTP <-> node: JSON parsing, validation and error bodies; no business logic."""

from __future__ import annotations

import hmac
import logging
import math
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
import trio
from starlette.applications import Starlette
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .channel_server import channel_server
from .config import Config
from .listing import PageError, parse_page
from .messages import WireError
from .metadata import Deps, MetadataError, parse_metadata
from .metrics import CONTENT_TYPE, registry_for, render
from .node import BUDGET_HEADER, HOPS_HEADER, RETRY_HEADER, WRITE_ID_HEADER, Node, Reply
from .observe import REQUEST_ID, REQUEST_ID_HEADER, ObserveMiddleware, Observer, RequestStats
from .openapi import SPEC
from .persist import PersistFailed
from .transport import SECRET_HEADER
from .view import ViewError, parse_view

log = logging.getLogger("trio_kv.api")

METADATA_FIELD = "causal-metadata"
METADATA_HEADER = "x-causal-metadata"
_NO_BODY = object()


class _KeyConvertor(PathConvertor):
    """Starlette's ``path`` is ``.*``, which stops at a newline: a key holding ``%0A`` got
    404 "no such endpoint".  ``_key_of`` reads the key from the raw path anyway."""

    regex = "(?s:.*)"


register_url_convertor("kvkey", _KeyConvertor())


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _json(status: int, body: dict[str, Any]) -> Response:
    return FastJSONResponse(body, status_code=status)


def _reply(reply: Reply) -> Response:
    if reply.raw is not None:
        return Response(reply.raw, status_code=reply.status, media_type="application/json")
    return _json(reply.status, reply.payload or {})


# The headers trio-kv reads: gathered in one pass over the raw list, where Starlette's
# ``Headers`` lowercases, encodes and scans the whole list again for every lookup.
_READ_HEADERS = frozenset(name.encode() for name in (
    METADATA_HEADER, HOPS_HEADER, BUDGET_HEADER, WRITE_ID_HEADER, RETRY_HEADER, SECRET_HEADER,
    "content-length", "transfer-encoding"))


def _headers_of(request: Request) -> dict[str, str]:
    """The headers of ``_READ_HEADERS`` the request has (the first of repeated ones, as
    ``Headers.get`` gives), decoded as latin-1."""
    found: dict[str, str] = {}
    for name, value in request.scope["headers"]:
        if name in _READ_HEADERS and (text := name.decode("latin-1")) not in found:
            found[text] = value.decode("latin-1")
    return found


async def _body(request: Request, headers: Mapping[str, str], limit: int, timeout: float) -> Any:
    """The decoded JSON body, or ``_NO_BODY`` when it is empty (GET often has none)."""
    length = headers.get("content-length")
    if (length is None or length == "0") and "transfer-encoding" not in headers and (
        request.scope.get("http_version") in ("1.0", "1.1")
    ):
        return _NO_BODY  # HTTP/1 without a length or chunking has no body (RFC 9112, 6.3)
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(timeout) as scope:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body larger than {limit} bytes")
            chunks.append(chunk)
    if scope.cancelled_caught:
        raise ApiError(408, f"request body not received within {timeout:g}s (read_timeout)")
    return _decode(b"".join(chunks))


def _decode(raw: bytes) -> Any:
    """The decoded JSON body, or ``_NO_BODY`` when it is empty."""
    if not raw.strip():
        return _NO_BODY
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "request body is not valid JSON") from exc


def _metadata(headers: Mapping[str, str], body: Any, node: Node) -> Deps:
    if isinstance(body, dict) and METADATA_FIELD in body:
        raw = body[METADATA_FIELD]
    elif (header := headers.get(METADATA_HEADER)) is not None and header.strip():
        try:
            raw = orjson.loads(header)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "X-Causal-Metadata header is not valid JSON") from exc
    else:
        raw = None
    try:
        return parse_metadata(raw, node.token_rules, node.wall_ms())
    except MetadataError as exc:
        raise ApiError(400, str(exc)) from exc


def key_of_path(raw_path: bytes) -> str:
    """The key is one raw path segment, percent-decoded: ``a%2Fb`` is the key ``a/b``."""
    segment = raw_path.split(b"?", 1)[0][len(b"/data/") :]
    if not segment or b"/" in segment:
        raise ApiError(400, "a key is one non-empty URL path segment")
    try:
        return unquote_to_bytes(segment).decode()
    except UnicodeDecodeError as exc:
        raise ApiError(400, "key is not valid UTF-8") from exc


def _key_of(request: Request) -> str:
    raw_path = request.scope.get("raw_path")
    if raw_path:
        return key_of_path(raw_path)
    key: str = request.path_params["key"]
    if not key or "/" in key:
        raise ApiError(400, "a key is one non-empty URL path segment")
    return key


_WRITE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def _has_secret(headers: Mapping[str, str], secret: bytes) -> bool:
    """Constant-time; compared as bytes (header text may hold any latin-1 character)."""
    given = headers.get(SECRET_HEADER, "").encode("latin-1")
    return hmac.compare_digest(given, secret)


def _node_headers(
    headers: Mapping[str, str], cfg: Config, trusted: bool
) -> tuple[int, float | None, str | None, bool]:
    """Hops, budget, write id and retry mark: set by nodes when they forward.  Always
    validated; with a cluster secret they count only on requests that carry it (``trusted``;
    a client's are ignored)."""
    hops_text = headers.get(HOPS_HEADER)
    budget_text = headers.get(BUDGET_HEADER)
    write_id = headers.get(WRITE_ID_HEADER)
    retry_text = headers.get(RETRY_HEADER)
    if hops_text is None and budget_text is None and write_id is None and retry_text is None:
        return 0, None, None, False
    hops = 0
    if hops_text is not None:
        if not hops_text.isascii() or not hops_text.isdigit() or int(hops_text) > cfg.max_hops:
            raise ApiError(400, f"X-KV-Hops must be an integer from 0 to {cfg.max_hops}")
        hops = int(hops_text)
    budget = None
    if budget_text is not None:
        try:
            budget = float(budget_text)
        except ValueError:
            budget = -1.0
        if not math.isfinite(budget) or budget < 0:
            raise ApiError(400, "X-KV-Budget must be a non-negative number of seconds")
    if write_id is not None and not _WRITE_ID.fullmatch(write_id):
        raise ApiError(400, "X-KV-Write-Id must be 1 to 128 of A-Z a-z 0-9 . _ -")
    if retry_text is not None and (retry_text != "1" or write_id is None):
        raise ApiError(400, "X-KV-Retry must be 1, and only with X-KV-Write-Id")
    if not trusted:
        return 0, None, None, False
    return hops, budget, write_id, retry_text is not None


class HeaderLimit:
    """Pure ASGI middleware: header bytes past ``max_header_bytes`` get a JSON 431 before any
    route runs (hypercorn's own cap on the raw request head answers the same way: see
    ``server.py``)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
            sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > self.limit
        ):
            body = {"error": f"request headers larger than {self.limit} bytes (max_header_bytes)"}
            await _json(431, body)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def build_app(node: Node) -> Starlette:
    cfg = node.config
    secret = cfg.cluster_secret.encode()

    async def ping(request: Request) -> Response:
        return _json(200, {"ok": True, "id": node.node_id, "view": node.replica.view is not None})

    def _valid_key(key: str) -> str:
        if len(key.encode()) > cfg.max_key_bytes:
            raise ApiError(400, f"key longer than {cfg.max_key_bytes} bytes")
        return key

    def trusted(headers: Mapping[str, str]) -> bool:
        return not secret or _has_secret(headers, secret)

    async def data_key_reply(
        method: str, key: str, body: Any, headers: Mapping[str, str], trust: bool
    ) -> Reply:
        """``/data/<key>``, over HTTP or a peer channel (``trust``: it carried the secret)."""
        if body is not _NO_BODY and not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        hops, budget, write_id, retry = _node_headers(headers, cfg, trust)
        deps = _metadata(headers, body, node)
        value = None
        if method == "PUT":
            if body is _NO_BODY:
                raise ApiError(400, "PUT needs a JSON body with a 'value'")
            assert isinstance(body, dict)
            value = body.get("value")
            if not isinstance(value, str):
                raise ApiError(400, "'value' is missing or not a string")
            if len(value.encode()) > cfg.max_value_bytes:
                raise ApiError(413, f"value larger than {cfg.max_value_bytes} bytes")
        reply = await node.data(method, key, deps, value, hops, budget, write_id, retry,
                                request_id=REQUEST_ID.get())
        await node.durable()  # persist, then answer: what we show must survive a crash
        return reply

    async def data_key(request: Request) -> Response:
        key = _valid_key(_key_of(request))  # before reading a body for it
        headers = _headers_of(request)
        body = await _body(request, headers, cfg.max_request_bytes, cfg.read_timeout)
        reply = await data_key_reply(request.method, key, body, headers, trusted(headers))
        return _reply(reply)

    async def data_all(request: Request) -> Response:
        try:
            page = parse_page(request.query_params, cfg.max_page_items, cfg.max_key_bytes)
        except PageError as exc:
            raise ApiError(400, str(exc)) from exc
        headers = _headers_of(request)
        body = await _body(request, headers, cfg.max_request_bytes, cfg.read_timeout)
        if body is not _NO_BODY and not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        hops, budget, _, _ = _node_headers(headers, cfg, trusted(headers))
        deps = _metadata(headers, body, node)
        reply = await node.data("GET", None, deps, None, hops, budget, page=page,
                                request_id=REQUEST_ID.get())
        await node.durable()
        return _reply(reply)

    requests = RequestStats()
    observer = Observer(requests, cfg.max_request_id_bytes, cfg.access_log)
    registry = registry_for(node, requests)
    openapi = orjson.dumps(SPEC)

    async def metrics(request: Request) -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE)

    async def openapi_json(request: Request) -> Response:
        return Response(openapi, media_type="application/json")

    async def view(request: Request) -> Response:
        if request.method == "GET":
            return _json(200, node.view_status())
        headers = _headers_of(request)
        if secret and not _has_secret(headers, secret):
            raise ApiError(401, "PUT /view needs the cluster secret (X-KV-Secret)")
        body = await _body(request, headers, cfg.max_request_bytes, cfg.read_timeout)
        try:
            new = parse_view(None if body is _NO_BODY else body, cfg.vnodes, cfg.max_view_nodes)
        except ViewError as exc:
            raise ApiError(400, str(exc)) from exc
        failure = await node.put_view(new)
        if failure is not None:
            return _json(503, {"error": failure, **node.view_status()})
        return _json(200, {"message": "view applied", **node.view_status()})

    peer_messages = {"/internal/sync": node.on_sync, "/internal/handoff": node.on_handoff,
                     "/internal/pull": node.on_pull, "/internal/stable": node.on_stable}

    async def peer_answer(path: str, body: Any, peer: str) -> dict[str, Any]:
        try:
            answer: dict[str, Any] = await peer_messages[path](body)
        except WireError as exc:
            log.warning("node %s: refused %s from %s: %s", node.node_id, path, peer, exc)
            raise ApiError(400, str(exc)) from exc
        # a sync's "seen up to n", a handoff's ack, a pull page's fence: on disk first
        await node.durable()
        return answer

    def _internal(path: str) -> Any:
        async def endpoint(request: Request) -> Response:
            headers = _headers_of(request)
            if secret and not _has_secret(headers, secret):
                raise ApiError(401, "internal endpoint: cluster secret missing or wrong")
            body = await _body(request, headers, cfg.max_peer_message_bytes, cfg.read_timeout)
            peer = request.client.host if request.client else "?"
            return _json(200, await peer_answer(path, body, peer))

        return endpoint

    async def direct(
        method: str, path: str, headers: dict[str, str], body: bytes, peer: str
    ) -> tuple[int, bytes] | None:
        """A channel frame for ``/data/<key>`` or a peer message, served without the ASGI
        stack (a third of a forwarded request's cost at the owner); the same validation, counts
        and errors as over HTTP.  The channel carried the secret.  None: the app serves it."""
        if method in ("GET", "PUT", "DELETE") and path.startswith("/data/") and "?" not in path:
            limit = cfg.max_request_bytes
        elif method == "POST" and path in peer_messages:
            limit = cfg.max_peer_message_bytes
        else:
            return None
        started = time.perf_counter()
        rid = headers.get(REQUEST_ID_HEADER)
        request_id = observer.request_id(rid.encode() if rid is not None else None)
        if request_id is None:
            observer.done(method, path, 400, started, None)
            return 400, orjson.dumps({"error": observer.bad_id})
        token = REQUEST_ID.set(request_id)
        observer.stats.in_flight += 1
        status = 500
        try:
            if len(body) > limit:
                raise ApiError(413, f"request body larger than {limit} bytes")
            if path in peer_messages:
                status, answer = 200, orjson.dumps(await peer_answer(path, _decode(body), peer))
            else:
                key = _valid_key(key_of_path(path.encode()))
                reply = await data_key_reply(method, key, _decode(body), headers, True)
                status = reply.status
                answer = reply.raw if reply.raw is not None else orjson.dumps(reply.payload or {})
        except ApiError as exc:
            status, answer = exc.status, orjson.dumps({"error": exc.message})
        except PersistFailed as exc:
            status, answer = 503, orjson.dumps({"error": f"this node is stopping: {exc}"})
        except Exception:
            log.exception("unhandled error on %s %s (peer channel)", method, path)
            answer = orjson.dumps({"error": "internal error; see the node's log"})
        finally:
            observer.stats.in_flight -= 1
            REQUEST_ID.reset(token)
            observer.done(method, path, status, started, request_id)
        return status, answer

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _json(exc.status, {"error": exc.message})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        messages = {404: "no such endpoint", 405: "method not allowed on this endpoint"}
        return _json(exc.status_code, {"error": messages.get(exc.status_code, str(exc.detail))})

    async def persist_failed(request: Request, exc: Exception) -> Response:
        return _json(503, {"error": f"this node is stopping: {exc}"})

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _json(500, {"error": "internal error; see the node's log"})

    routes = [  # the router tries them in order: the busiest first
        Route("/data/{key:kvkey}", data_key, methods=["GET", "PUT", "DELETE"]),
        Route("/ping", ping, methods=["GET"]),
        Route("/data", data_all, methods=["GET"]),
        Route("/view", view, methods=["GET", "PUT"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        *(Route(path, _internal(path), methods=["POST"]) for path in peer_messages),
    ]
    app = Starlette(
        routes=routes,
        # outermost first: every answer, a 431 too, is counted and carries its request id
        middleware=[Middleware(ObserveMiddleware, observer=observer),
                    Middleware(HeaderLimit, limit=cfg.max_header_bytes)],
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            PersistFailed: persist_failed,
            Exception: server_error,
        },
    )
    app.router.redirect_slashes = False
    # the listener serves the peer channel on the same port (listener.py)
    app.state.serve_channel = channel_server(
        lambda: app, direct, secret, cfg.channel_max_in_flight, cfg.max_header_bytes,
        cfg.max_peer_message_bytes + cfg.max_header_bytes, cfg.connection_read_timeout,
        cfg.read_timeout, cfg.channel_send_linger)
    return app
