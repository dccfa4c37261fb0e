"""``GET /openapi.json``: the client API as OpenAPI 3.0, written by hand from docs/API.md.

Node-to-node routes (``/internal/``) are not part of it: clients never call them.  A test
runs generated requests from this document against a live node (no 5xx, every error JSON
with ``error``), which keeps it true to the code.
"""

from __future__ import annotations

from typing import Any

_JSON = "application/json"
_MAX_INT = 2**53 - 1  # far below any timestamp a node issues today: never "from the future"
_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _answer(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref(schema)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    words = {
        400: "The request is malformed (body, key, token, query or header); nothing changed.",
        401: "The cluster secret is missing or wrong.",
        404: "The key does not exist (the token is returned unchanged).",
        408: "The body arrived slower than the node's read_timeout.",
        413: "The body or the value is larger than the node accepts.",
        431: "The request's headers are larger than the node accepts.",
        503: "Not available yet: no view, a view change, causal dependencies not arrived in "
        "time, or the owning shard unreachable; retry, perhaps at another node.",
    }
    return {str(s): _answer(words[s], "Error") for s in statuses}


_METADATA_HEADER = {
    "name": "X-Causal-Metadata", "in": "header", "required": False,
    "description": "The session's causal metadata as JSON text, for clients that send no "
    "body on GET/DELETE.",
    "content": {_JSON: {"schema": _ref("Metadata")}},
}
_REQUEST_ID = {
    "name": "X-Request-Id", "in": "header", "required": False,
    "description": "Names the request in every node's log and is echoed in the answer; "
    "visible ASCII, at most 128 bytes by default. Minted by the node when absent.",
    "schema": {"type": "string", "pattern": "^[!-~]{1,128}$"},
}
_KEY = {
    "name": "key", "in": "path", "required": True,
    "description": "One URL path segment, percent-decoded; at most 1024 bytes of UTF-8 "
    "(max_key_bytes; 256 characters always fit).",
    "schema": {"type": "string", "minLength": 1, "maxLength": 256},
}
_TOKEN_BODY = {
    "required": False,
    "content": {_JSON: {"schema": _ref("TokenBody")}},
}

SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "trio-kv",
        "version": "1",
        "description": "A sharded, replicated, causally consistent key-value store. Every "
        "data answer carries `causal-metadata`; pass it on with the next request (body field "
        "or X-Causal-Metadata header) and reads never miss your causal past. See docs/API.md.",
    },
    "paths": {
        "/ping": {"get": {
            "summary": "Liveness: answers as soon as the HTTP server is up.",
            "operationId": "ping",
            "parameters": [_REQUEST_ID],
            "responses": {"200": _answer("Up.", "Ping")},
        }},
        "/data/{key}": {
            "parameters": [_KEY, _METADATA_HEADER, _REQUEST_ID],
            "get": {
                "summary": "Read a key; waits (bounded) until the session's causal past on "
                "this key has arrived.",
                "operationId": "getKey",
                "requestBody": _TOKEN_BODY,
                "responses": {"200": _answer("The value.", "Value"),
                              **_errors(400, 404, 413, 431, 503)},
            },
            "put": {
                "summary": "Write a key, causally after the session's past.",
                "operationId": "putKey",
                "requestBody": {"required": True,
                                "content": {_JSON: {"schema": _ref("PutBody")}}},
                "responses": {"200": _answer("Written.", "Token"),
                              **_errors(400, 408, 413, 431, 503)},
            },
            "delete": {
                "summary": "Delete a key (a tombstone that replicates like a write).",
                "operationId": "deleteKey",
                "requestBody": _TOKEN_BODY,
                "responses": {"200": _answer("Deleted.", "Token"),
                              **_errors(400, 404, 413, 431, 503)},
            },
        },
        "/data": {"get": {
            "summary": "Every live key of this node's shard (a routing node: of every shard), "
            "or one page of them in key order.",
            "operationId": "listKeys",
            "parameters": [
                {"name": "limit", "in": "query", "required": False,
                 "description": "Page size, 1 to max_page_items (1000 by default). With limit "
                 "or after the answer has `next`.",
                 "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                {"name": "after", "in": "query", "required": False,
                 "description": "Cursor: the `next` of the previous page (keys after it).",
                 "schema": {"type": "string"}},
                _METADATA_HEADER, _REQUEST_ID,
            ],
            "requestBody": _TOKEN_BODY,
            "responses": {"200": _answer("Items (and `next` when paging).", "Items"),
                          **_errors(400, 413, 431, 503)},
        }},
        "/view": {
            "get": {
                "summary": "This node's view, id, shard, epoch and view-change progress.",
                "operationId": "getView",
                "parameters": [_REQUEST_ID],
                "responses": {"200": _answer("Status.", "ViewStatus")},
            },
            "put": {
                "summary": "Install a view (operators). Answers once this node serves it.",
                "operationId": "putView",
                "parameters": [
                    {"name": "X-KV-Secret", "in": "header", "required": False,
                     "description": "The cluster secret, when one is configured.",
                     "schema": {"type": "string"}},
                    _REQUEST_ID,
                ],
                "requestBody": {"required": True,
                                "content": {_JSON: {"schema": _ref("ViewBody")}}},
                "responses": {"200": _answer("Applied.", "ViewStatus"),
                              **_errors(400, 401, 408, 413, 431, 503)},
            },
        },
        "/metrics": {"get": {
            "summary": "Prometheus metrics of this node (text exposition format).",
            "operationId": "metrics",
            "responses": {"200": {"description": "Metrics.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
        "/openapi.json": {"get": {
            "summary": "This document.",
            "operationId": "openapi",
            "responses": {"200": {"description": "OpenAPI 3.0.",
                                  "content": {_JSON: {"schema": {"type": "object"}}}}},
        }},
    },
    "components": {"schemas": {
        "Metadata": {
            "type": "object",
            "description": "Opaque causal metadata: pass on what the last answer gave.",
            "properties": {"deps": {
                "type": "object",
                "maxProperties": 256,
                "description": "Keys as in a URL: non-empty, at most max_key_bytes.",
                "propertyNames": {"minLength": 1, "maxLength": 256},
                "additionalProperties": {
                    "type": "array", "minItems": 2, "maxItems": 2,
                    "description": "[timestamp, node id]; timestamps the store issued "
                    "(never far ahead of its clocks).",
                    "items": {"type": "integer", "minimum": 0, "maximum": _MAX_INT}},
            }},
            "additionalProperties": False,
        },
        "TokenBody": {
            "type": "object",
            "properties": {"causal-metadata": {"nullable": True,
                                               "allOf": [_ref("Metadata")]}},
        },
        "PutBody": {
            "type": "object", "required": ["value"],
            "properties": {"value": {"type": "string", "maxLength": 262144,
                                     "description": "At most max_value_bytes (1 MiB) of "
                                     "UTF-8; 262,144 characters always fit."},
                           "causal-metadata": {"nullable": True,
                                               "allOf": [_ref("Metadata")]}},
        },
        "Token": {"type": "object", "required": ["causal-metadata"],
                  "properties": {"causal-metadata": _ref("Metadata")}},
        "Value": {"type": "object", "required": ["value", "causal-metadata"],
                  "properties": {"value": {"type": "string"},
                                 "causal-metadata": _ref("Metadata")}},
        "Items": {"type": "object", "required": ["items", "causal-metadata"],
                  "properties": {
                      "items": {"type": "object", "additionalProperties": {"type": "string"}},
                      "causal-metadata": _ref("Metadata"),
                      "next": {"type": "string", "nullable": True,
                               "description": "Pass as `after` for the next page; null on "
                               "the last. Present only when paging."}}},
        "Error": {"type": "object", "required": ["error"],
                  "properties": {"error": {"type": "string"},
                                 "causal-metadata": _ref("Metadata")}},
        "Ping": {"type": "object", "required": ["ok"],
                 "properties": {"ok": {"type": "boolean"}, "id": {"type": "integer"},
                                "view": {"type": "boolean"}}},
        "Member": {"type": "object", "required": ["address", "id"],
                   "properties": {"address": {"type": "string", "example": "10.0.0.2:8081"},
                                  "id": {"oneOf": [{"type": "integer", "minimum": 0},
                                                   {"type": "string"}]}}},
        "ViewBody": {"type": "object", "required": ["view"], "properties": {"view": {
            "oneOf": [
                {"type": "object", "minProperties": 1,
                 "additionalProperties": {"type": "array", "minItems": 1,
                                          "items": _ref("Member")}},
                {"type": "array", "minItems": 1, "items": _ref("Member")},
            ]}}},
        "ViewStatus": {"type": "object", "properties": {
            "view": {"type": "object", "nullable": True},
            "id": {"type": "integer"},
            "shard": {"type": "string", "nullable": True},
            "epoch": {"type": "integer"},
            "view_id": {"type": "string", "nullable": True},
            "keys": {"type": "integer"},
            "change": {"type": "object"},
            "shipped": {"type": "object", "description": "Entries sent for view changes since "
                        "start (pull pages served, handoff copies), each copy counted.",
                        "additionalProperties": {"type": "integer"}},
        }},
    }},
}
