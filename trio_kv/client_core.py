"""What ``Client`` and ``AsyncClient`` share, with no I/O: requests, answers, the session.

The session is the causal metadata the store hands back with every answer.  It is kept here
and sent with every request, so a session's reads never miss its own writes or anything it
has read, whichever node serves them.  Concurrent calls of one client each send the token of
their start; an answer replaces what it was sent with, and keeps what other calls added
meanwhile (so neither loses the other's writes, and what the store pruned stays pruned).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from .errors import BadRequest, OutcomeUnknown, ProtocolError, TrioKVError, error_for

_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")
METADATA_HEADER = "X-Causal-Metadata"
SECRET_HEADER = "X-KV-Secret"


def parse_nodes(nodes: str | Iterable[str]) -> list[str]:
    """``host:port`` addresses (a comma-separated string or a list), validated."""
    items = nodes.split(",") if isinstance(nodes, str) else list(nodes)
    out: list[str] = []
    for raw in items:
        address = raw.strip()
        if address.startswith("http://"):
            address = address[len("http://") :].rstrip("/")
        match = _ADDRESS.match(address)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise ValueError(f"node address {raw!r} is not host:port")
        out.append(address)
    if not out:
        raise ValueError("at least one node address (host:port) is needed")
    return out


def check_session(session: Any) -> dict[str, Any]:
    """A session handed over (from ``Client.session``, a file, another process)."""
    if session is None:
        return {}
    if not isinstance(session, dict):
        raise ValueError("a session is the JSON object a client's .session gave")
    return dict(session)


@dataclass(frozen=True, slots=True)
class Call:
    """One request: what to send, and how to read the answer."""

    method: str
    path: str
    key: str | None = None  # names the key in KeyNotFound
    value: str | None = None
    query: dict[str, Any] | None = None
    body: Any = None  # a full JSON body (PUT /view)
    write: bool = False  # retried elsewhere only when surely not applied
    sessionless: bool = False  # status calls carry no token


def key_path(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise BadRequest("a key is a non-empty string")
    return "/data/" + quote(key, safe="")


class Core:
    """Node order, backoff, the session, and turning answers into values or errors."""

    def __init__(
        self,
        nodes: str | Sequence[str],
        session: Any,
        retries: int,
        backoff: float,
        max_backoff: float,
        secret: str | None,
    ) -> None:
        self.nodes = parse_nodes(nodes)
        self.session = check_session(session)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.secret = secret
        self.current = 0  # index of the node that answered last

    def request(self, call: Call, node: str) -> tuple[str, str, dict[str, str], bytes | None]:
        """Method, URL, headers and body to send ``call`` to ``node``; the token sent is
        ``self.session`` as it is now (``sent_token`` returns it)."""
        headers = {"accept": "application/json"}
        content: bytes | None = None
        token = self.session
        if call.body is not None:
            content = orjson.dumps(call.body)
        elif call.method == "PUT" and not call.sessionless:
            content = orjson.dumps({"value": call.value, "causal-metadata": token})
        elif not call.sessionless and token:
            headers[METADATA_HEADER] = orjson.dumps(token).decode()
        if content is not None:
            headers["content-type"] = "application/json"
        if self.secret and call.path == "/view" and call.method == "PUT":
            headers[SECRET_HEADER] = self.secret  # only views need it, and only if asked
        url = f"http://{node}{call.path}"
        return call.method, url, headers, content

    def order(self) -> list[str]:
        """Nodes to try: the last one that answered first, then the others in turn."""
        n = len(self.nodes)
        return [self.nodes[(self.current + i) % n] for i in range(n)]

    def delay(self, attempt: int) -> float:
        """Exponential, jittered, capped: a recovering cluster is not flooded."""
        base: float = min(self.max_backoff, self.backoff * 2.0 ** max(0, attempt - 1))
        return base * random.uniform(0.5, 1.0)

    def absorb(self, sent: dict[str, Any], answer: Any) -> None:
        if not isinstance(answer, dict):
            return
        token = answer.get("causal-metadata")
        if not isinstance(token, dict):
            return
        current = self.session
        if current is sent or current == sent:
            self.session = token
            return
        # another call of this client changed the session while this one was out
        new = dict(token.get("deps") or {})
        sent_deps = sent.get("deps") or {}
        for key, version in (current.get("deps") or {}).items():
            if sent_deps.get(key) != version and (key not in new or version > new[key]):
                new[key] = version
        self.session = {"deps": new} if new else {}

    def interpret(self, call: Call, status: int, raw: bytes, sent: dict[str, Any]) -> Any:
        """The decoded answer of a 200, or the error for any other status."""
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            if call.path == "/metrics" and status == 200:
                return raw.decode()
            raise ProtocolError(f"HTTP {status} with a body that is not JSON", status) from None
        if call.path.startswith("/data") and status in (200, 404):
            self.absorb(sent, body)
        if status == 200:
            return body
        raise error_for(status, body, call.key)

    @staticmethod
    def retryable(call: Call, exc: TrioKVError) -> bool:
        """503s that did nothing may go to another node; an ambiguous write may not."""
        return exc.status == 503 and not isinstance(exc, OutcomeUnknown)
