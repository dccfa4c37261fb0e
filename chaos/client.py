"""A causal client that records every operation it makes into a :class:`History`.

One :class:`KVClient` is one causal session: it sends the metadata of its last successful
answer with every request and replaces it with what the server returns, exactly as API.md
asks of clients.  Writes carry metadata in the JSON body; reads and deletes carry it in the
``X-Causal-Metadata`` header (both forms are part of the contract, so both get exercised).

Outcomes, as the checker needs them: a write answered 200 is ``ok``; a write that timed out
or got a 5xx is ``info`` (it may still have happened); a 4xx is ``fail``.  Reads are ``ok``
on 200/404 and ``fail`` otherwise.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx

from chaos.history import History, Op, OpKind, Outcome


class KVClient:
    """One client session against a trio-kv cluster (thread-confined: one op at a time)."""

    def __init__(self, name: str, history: History | None = None, *,
                 timeout: float = 40.0, connect_timeout: float = 3.0) -> None:
        self.name = name
        self.history = history if history is not None else History()
        self.meta: dict[str, Any] = {}
        self.http = httpx.Client(trust_env=False,
                                 timeout=httpx.Timeout(timeout, connect=connect_timeout))

    def close(self) -> None:
        """Release the connection pool."""
        self.http.close()

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, kind: OpKind, base_url: str, key: str | None,
              value: str | None = None) -> Op:
        op = self.history.begin(self.name, kind, key, value, base_url, self.meta)
        url = f"{base_url}/data" + (f"/{quote(key, safe='')}" if key is not None else "")
        try:
            if kind == "put":
                response = self.http.put(url, json={"value": value,
                                                    "causal-metadata": self.meta})
            else:
                method = "DELETE" if kind == "delete" else "GET"
                headers = {"X-Causal-Metadata": json.dumps(self.meta)}
                response = self.http.request(method, url, headers=headers)
        except httpx.HTTPError as exc:
            outcome: Outcome = "info" if kind in ("put", "delete") else "fail"
            return self.history.finish(op, status=None, outcome=outcome,
                                       error=f"{type(exc).__name__}: {exc}")
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return self.history.finish(op, status=status, outcome="fail",
                                       error=f"non-JSON-object body: {response.text[:200]!r}")
        meta = body.get("causal-metadata")
        if status in (200, 404) and isinstance(meta, dict):
            self.meta = meta
        if kind in ("put", "delete"):
            if status == 200 or (kind == "delete" and status == 404):
                outcome = "ok"
            else:
                outcome = "info" if status >= 500 else "fail"
        else:
            outcome = "ok" if status == 200 or (kind == "get" and status == 404) else "fail"
        read_value = body.get("value") if kind == "get" and status == 200 else None
        items = body.get("items") if kind == "get_all" and status == 200 else None
        return self.history.finish(op, status=status, outcome=outcome, value=read_value,
                                   meta_out=meta, items=items,
                                   error=None if outcome == "ok" else str(body.get("error")))

    def put(self, base_url: str, key: str, value: str) -> Op:
        """``PUT /data/<key>``; the value must be unique in the scenario (the checker relies
        on it)."""
        return self._call("put", base_url, key, value)

    def get(self, base_url: str, key: str) -> Op:
        """``GET /data/<key>``; ``op.value`` is None when the answer was 404."""
        return self._call("get", base_url, key)

    def delete(self, base_url: str, key: str) -> Op:
        """``DELETE /data/<key>``."""
        return self._call("delete", base_url, key)

    def get_all(self, base_url: str) -> Op:
        """``GET /data``: every live key of the answering node's shard."""
        return self._call("get_all", base_url, None)
