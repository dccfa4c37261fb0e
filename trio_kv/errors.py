"""Typed errors of ``trio_kv.client``: one class per way a request can fail."""

from __future__ import annotations

from typing import Any


class TrioKVError(Exception):
    """A request failed; ``status`` is the HTTP status (0 when no node answered)."""

    def __init__(self, message: str, status: int = 0, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body


class BadRequest(TrioKVError):
    """400: the node refused the request as malformed; nothing changed."""


class Unauthorized(TrioKVError):
    """401: the cluster secret is missing or wrong (only PUT /view needs one)."""


class KeyNotFound(TrioKVError, LookupError):
    """404: the key does not exist (or was deleted) in the session's causal view."""

    def __init__(self, key: str, message: str = "", status: int = 404, body: Any = None) -> None:
        super().__init__(message or f"key {key!r} does not exist", status, body)
        self.key = key


class TooLarge(BadRequest):
    """413 or 431: the value, body or headers are larger than the node accepts."""


class Unavailable(TrioKVError):
    """No node could serve the request in time (connection failures, or 503 after retries)."""


class OutcomeUnknown(Unavailable):
    """A write reached a node but no answer came back: it may or may not have been applied.

    It is not retried at another node: a second copy could overwrite a later write."""


class ProtocolError(TrioKVError):
    """A node answered something that is not the contract's JSON."""


def error_for(status: int, body: Any, key: str | None) -> TrioKVError:
    message = body.get("error") if isinstance(body, dict) else None
    text = message if isinstance(message, str) else f"HTTP {status}"
    if status == 404 and key is not None:
        return KeyNotFound(key, text, status, body)
    if status in (413, 431):
        return TooLarge(text, status, body)
    if status == 400 or status == 404:
        return BadRequest(text, status, body)
    if status == 401:
        return Unauthorized(text, status, body)
    if status == 503:
        if isinstance(body, dict) and body.get("outcome") == "unknown":
            return OutcomeUnknown(text, status, body)
        return Unavailable(text, status, body)
    return TrioKVError(text, status, body)
