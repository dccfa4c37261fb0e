"""HTTP <-> node: JSON parsing, validation and error bodies; no business logic."""

from __future__ import annotations

import hmac
import logging
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .messages import WireError
from .metadata import Deps, MetadataError, parse_metadata
from .node import BUDGET_HEADER, HOPS_HEADER, WRITE_ID_HEADER, Node, Reply
from .persist import PersistFailed
from .transport import SECRET_HEADER
from .view import ViewError, parse_view

log = logging.getLogger("trio_kv.api")

METADATA_FIELD = "causal-metadata"
METADATA_HEADER = "x-causal-metadata"
_NO_BODY = object()


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


async def _body(request: Request, limit: int) -> Any:
    """The decoded JSON body, or ``_NO_BODY`` when it is empty (GET often has none)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return _NO_BODY
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "request body is not valid JSON") from exc


def _metadata(request: Request, body: Any) -> Deps:
    if isinstance(body, dict) and METADATA_FIELD in body:
        raw = body[METADATA_FIELD]
    elif (header := request.headers.get(METADATA_HEADER)) is not None and header.strip():
        try:
            raw = orjson.loads(header)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "X-Causal-Metadata header is not valid JSON") from exc
    else:
        raw = None
    try:
        return parse_metadata(raw)
    except MetadataError as exc:
        raise ApiError(400, str(exc)) from exc


def _key_of(request: Request) -> str:
    """The key is one raw path segment, percent-decoded: ``a%2Fb`` is the key ``a/b``."""
    raw_path = request.scope.get("raw_path")
    if raw_path:
        segment = raw_path.split(b"?", 1)[0][len(b"/data/") :]
        if not segment or b"/" in segment:
            raise ApiError(400, "a key is one non-empty URL path segment")
        try:
            return unquote_to_bytes(segment).decode()
        except UnicodeDecodeError as exc:
            raise ApiError(400, "key is not valid UTF-8") from exc
    key: str = request.path_params["key"]
    if not key or "/" in key:
        raise ApiError(400, "a key is one non-empty URL path segment")
    return key


def _forwarding(request: Request) -> tuple[int, float | None]:
    try:
        hops = int(request.headers.get(HOPS_HEADER, "0"))
        budget_text = request.headers.get(BUDGET_HEADER)
        return hops, float(budget_text) if budget_text is not None else None
    except ValueError as exc:
        raise ApiError(400, "malformed forwarding headers") from exc


def build_app(node: Node) -> Starlette:
    cfg = node.config

    async def ping(request: Request) -> Response:
        return _json(200, {"ok": True, "id": node.node_id, "view": node.replica.view is not None})

    async def data_key(request: Request) -> Response:
        key = _key_of(request)
        if len(key.encode()) > cfg.max_key_bytes:
            raise ApiError(400, f"key longer than {cfg.max_key_bytes} bytes")
        body = await _body(request, cfg.max_request_bytes)
        if body is not _NO_BODY and not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        deps = _metadata(request, body)
        value = None
        if request.method == "PUT":
            if body is _NO_BODY:
                raise ApiError(400, "PUT needs a JSON body with a 'value'")
            assert isinstance(body, dict)
            value = body.get("value")
            if not isinstance(value, str):
                raise ApiError(400, "'value' is missing or not a string")
            if len(value.encode()) > cfg.max_value_bytes:
                raise ApiError(413, f"value larger than {cfg.max_value_bytes} bytes")
        hops, budget = _forwarding(request)
        write_id = request.headers.get(WRITE_ID_HEADER)
        return _reply(await node.data(request.method, key, deps, value, hops, budget, write_id))

    async def data_all(request: Request) -> Response:
        body = await _body(request, cfg.max_request_bytes)
        if body is not _NO_BODY and not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        hops, budget = _forwarding(request)
        return _reply(await node.data("GET", None, _metadata(request, body), None, hops, budget))

    async def view(request: Request) -> Response:
        if request.method == "GET":
            return _json(200, node.view_status())
        body = await _body(request, cfg.max_request_bytes)
        try:
            new = parse_view(None if body is _NO_BODY else body, cfg.vnodes)
        except ViewError as exc:
            raise ApiError(400, str(exc)) from exc
        await node.put_view(new)
        return _json(200, {"message": "view applied", **node.view_status()})

    def _internal(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            if cfg.cluster_secret and not hmac.compare_digest(
                request.headers.get(SECRET_HEADER, ""), cfg.cluster_secret
            ):
                raise ApiError(401, "internal endpoint: cluster secret missing or wrong")
            body = await _body(request, cfg.max_request_bytes + cfg.batch_bytes)
            try:
                return _json(200, await handler(body))
            except WireError as exc:
                raise ApiError(400, str(exc)) from exc

        return endpoint

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

    routes = [
        Route("/ping", ping, methods=["GET"]),
        Route("/data", data_all, methods=["GET"]),
        Route("/data/{key:path}", data_key, methods=["GET", "PUT", "DELETE"]),
        Route("/view", view, methods=["GET", "PUT"]),
        Route("/internal/sync", _internal(node.on_sync), methods=["POST"]),
        Route("/internal/handoff", _internal(node.on_handoff), methods=["POST"]),
        Route("/internal/pull", _internal(node.on_pull), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            PersistFailed: persist_failed,
            Exception: server_error,
        },
    )
    app.router.redirect_slashes = False
    return app
