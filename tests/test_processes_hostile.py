"""Issue 9 against real ``python -m trio_kv`` processes on 127.0.0.1: each reproduced failure
(items 1-7) as it was found, and a 30 x 900 KiB reshard.

Keys ``.`` and ``..`` go out percent-encoded (``%2E``, ``%2E%2E``: httpx would remove literal
dot segments from the URL) and once more as literal segments over a raw socket.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest

from trio_kv.view import parse_view

from .test_processes import Procs, _free_ports

SECRET = "process-tier-secret"
MAX_TOKEN_BYTES = 32768
MAX_TOKEN_DEPS = 256


class Nodes(Procs):
    """Real nodes with extra environment, node i (from 1) at ``url(i - 1)``."""

    def __init__(self, n: int, env: dict[str, str] | None = None, host: str = "127.0.0.1"):
        super().__init__(_free_ports(n))
        self.env = env or {}
        self.host = host

    def start(self, i: int) -> None:
        env = {**os.environ, "NODE_IDENTIFIER": str(i + 1), "KV_WAIT_DEADLINE": "5", **self.env}
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "trio_kv", "--host", self.host, "--port",
             str(self.ports[i])],
            env=env, stdout=subprocess.DEVNULL,
            stderr=open(f"{self.logdir}/node{i + 1}.log", "ab"),  # noqa: SIM115
        )

    def log(self, i: int) -> str:
        with open(f"{self.logdir}/node{i + 1}.log", errors="replace") as f:
            return f.read()

    def address(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def view(self, shards: dict[str, list[int]], extra: dict[str, list[tuple[int, str]]]
             | None = None) -> dict[str, Any]:
        """A view body of node indices (from 0) per shard, plus foreign (id, address) members."""
        view: dict[str, list[dict[str, Any]]] = {
            name: [{"address": self.address(i), "id": i + 1} for i in ids]
            for name, ids in shards.items()
        }
        for name, members in (extra or {}).items():
            view.setdefault(name, []).extend({"address": a, "id": m} for m, a in members)
        return {"view": view}

    def alive(self) -> list[int]:
        return [i + 1 for i, p in self.procs.items() if p.poll() is None]


def secret_headers(secret: bool) -> dict[str, str]:
    return {"x-kv-secret": SECRET} if secret else {}


@contextmanager
def cluster(n: int, shards: dict[str, list[int]] | None, env: dict[str, str] | None = None,
            host: str = "127.0.0.1") -> Iterator[Nodes]:
    """``n`` nodes, sent ``shards`` (node indices from 0) as their view unless None."""
    with Nodes(n, env, host).running() as nodes:
        if shards is not None:
            put_view_everywhere(nodes, nodes.view(shards), range(n))
        yield nodes


def put_view_everywhere(nodes: Nodes, body: dict[str, Any], targets: Any,
                        timeout: float = 60.0) -> list[httpx.Response]:
    """PUT /view to every target at once (as an operator's script would); all must be 200."""
    secret = bool(nodes.env.get("KV_CLUSTER_SECRET"))

    def one(i: int) -> httpx.Response:
        return httpx.put(nodes.url(i) + "/view", json=body, timeout=timeout,
                         headers=secret_headers(secret))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, targets))
    assert all(r.status_code == 200 for r in answers), [(r.status_code, r.text) for r in answers]
    return answers


def key_path(key: str) -> str:
    quoted = quote(key, safe="")
    return "/data/" + (quoted.replace(".", "%2E") if quoted in (".", "..") else quoted)


def assert_json_error(r: httpx.Response, *statuses: int) -> None:
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], r.text


def wall_hlc(seconds_ahead: float = 0.0) -> int:
    return int((time.time() + seconds_ahead) * 1000) << 16


def write_and_read_everywhere(nodes: Nodes, tag: str) -> None:
    """A write through each live node, then read through every node with the session token."""
    meta: Any = None
    with httpx.Client(timeout=30) as c:
        for i in nodes.procs:
            r = c.put(nodes.url(i) + key_path(f"{tag}{i}"),
                      json={"value": f"{tag}-{i}", "causal-metadata": meta})
            assert r.status_code == 200, (i, r.text)
            meta = r.json()["causal-metadata"]
        for i in nodes.procs:
            for j in nodes.procs:
                r = c.request("GET", nodes.url(i) + key_path(f"{tag}{j}"),
                              json={"causal-metadata": meta})
                assert r.status_code == 200 and r.json()["value"] == f"{tag}-{j}", (i, j, r.text)


def wait_until(probe: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not probe():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


# ------------------------------------------------------------------ item 1: one token kills
@pytest.mark.parametrize("timestamp", [2**64 - 1, 2**63, "ahead"])
def test_an_out_of_range_token_is_refused_and_poisons_nothing(timestamp: int | str) -> None:
    ts = wall_hlc(3600) if timestamp == "ahead" else timestamp
    with cluster(3, {"A": [0, 1, 2]}) as nodes, httpx.Client(timeout=30) as c:
        token = {"deps": {"x": [ts, 1]}}
        r = c.put(nodes.url(0) + "/data/y", json={"value": "v", "causal-metadata": token})
        assert_json_error(r, 400)
        r = c.get(nodes.url(0) + "/data/y",
                  headers={"x-causal-metadata": orjson.dumps(token).decode()})
        assert_json_error(r, 400)
        time.sleep(1.5)  # the replication task of issue 9 died about a second later
        assert nodes.alive() == [1, 2, 3]
        for i in range(3):
            assert c.get(nodes.url(i) + "/data/y").status_code == 404
        write_and_read_everywhere(nodes, "after")
        # no clock was moved: fresh writes carry timestamps near the wall clock
        r = c.put(nodes.url(1) + "/data/z", json={"value": "v"})
        stamp = r.json()["causal-metadata"]["deps"]["z"][0]
        assert stamp < wall_hlc(60), stamp


# ------------------------------------------------------------------ item 2: no boundary
def _forged_handoff(nodes: Nodes, sender: int | None) -> dict[str, Any]:
    status = httpx.get(nodes.url(0) + "/view", timeout=10).json()
    body: dict[str, Any] = {"entries": [["evil", "injected", wall_hlc(), 1, None]],
                            "epoch": status["epoch"], "view_id": status["view_id"]}
    if sender is not None:
        body["from"] = sender
    return body


@pytest.mark.parametrize("secret", [False, True], ids=["bare", "secret"])
def test_forged_handoff_injects_nothing(secret: bool) -> None:
    env = {"KV_CLUSTER_SECRET": SECRET} if secret else {}
    with cluster(3, {"A": [0, 1, 2]}, env) as nodes, httpx.Client(timeout=30) as c:
        # with the secret: refused even from a member; bare: a malformed sender is refused
        # (a well-formed one is not: a fresh node that replaces a whole cluster knows none of
        # the old owners that hand it their keys; only the secret tells peers from strangers)
        senders: list[int | None] = [1, 2, 99, None] if secret else [None, -1]
        for sender in senders:
            r = c.post(nodes.url(0) + "/internal/handoff", json=_forged_handoff(nodes, sender))
            assert_json_error(r, *((401,) if secret else (400, 403, 409)))
        for i in range(3):
            assert c.get(nodes.url(i) + "/data/evil").status_code == 404
        write_and_read_everywhere(nodes, "after")
        assert nodes.alive() == [1, 2, 3]


@pytest.mark.parametrize("secret", [False, True], ids=["bare", "secret"])
def test_forged_sync_does_not_stall_replication(secret: bool) -> None:
    env = {"KV_CLUSTER_SECRET": SECRET} if secret else {}
    with cluster(3, {"A": [0, 1, 2]}, env) as nodes, httpx.Client(timeout=30) as c:
        status = c.get(nodes.url(0) + "/view").json()
        probe = {"sender": 2, "origin": "2.probe", "view_id": "other", "epoch": 0, "after": 0,
                 "upto": 0, "entries": [], "seen": {}, "positions": []}
        r = c.post(nodes.url(0) + "/internal/sync", json=probe)  # learn node 1's stream name
        origin = r.json().get("origin") if r.status_code == 200 else None
        claims = {origin: 10**9} if origin else {f"1.{n}": 10**9 for n in range(4)}
        forged = {"sender": 2, "origin": "2.forged", "view_id": status["view_id"],
                  "epoch": status["epoch"], "after": 0, "upto": 10**9, "entries": [],
                  "seen": claims, "positions": []}
        r = c.post(nodes.url(0) + "/internal/sync", json=forged)
        assert r.status_code < 500, r.text
        if secret:
            assert_json_error(r, 401)
        # read-your-writes across nodes 1 -> 2 still holds at once (issue: stalled 35 s+)
        for n in range(5):
            r = c.put(nodes.url(0) + f"/data/ryw{n}", json={"value": str(n)})
            meta = r.json()["causal-metadata"]
            started = time.monotonic()
            r = c.request("GET", nodes.url(1) + f"/data/ryw{n}", json={"causal-metadata": meta})
            assert r.status_code == 200 and r.json()["value"] == str(n), r.text
            assert time.monotonic() - started < 3
        assert nodes.alive() == [1, 2, 3]


@pytest.mark.parametrize("secret", [False, True], ids=["bare", "secret"])
def test_forged_pull_with_an_invented_view_hijacks_nothing(secret: bool) -> None:
    env = {"KV_CLUSTER_SECRET": SECRET} if secret else {}
    with cluster(4, {"A": [0, 1], "B": [2, 3]}, env) as nodes, httpx.Client(timeout=30) as c:
        status = c.get(nodes.url(0) + "/view").json()
        trap = f"127.0.0.1:{_free_ports(1)[0]}"  # nothing listens there
        invented = {"A": [{"address": trap, "id": 91}], "B": [{"address": trap.replace(
            "127.0.0.1", "localhost"), "id": 92}]}
        hijack = {name: [{"address": f"localhost:{_free_ports(1)[0]}", "id": m["id"]}
                  for m in members] for name, members in status["view"].items()}
        for view, sender in ((invented, 91), (hijack, 2)):
            body = {"view": view, "within": [[status["view"], "A"], [status["view"], "B"]],
                    "after": "", "limit": 1000, "from": sender, "epoch": status["epoch"] + 5}
            r = c.post(nodes.url(0) + "/internal/pull", json=body)
            assert r.status_code < 500, r.text
            if secret:
                assert_json_error(r, 401)
            elif sender == 2:  # our own member at an address the sender chose: refused
                assert_json_error(r, 400, 403, 409)
            # (bare, a node of a view we do not know yet: it may be a new owner pulling
            # before we got that view, so it may be answered; it must hijack nothing)
        # every node still serves every key itself or through the real owners, and no write
        # is dropped while answering 200
        write_and_read_everywhere(nodes, "after")
        after = c.get(nodes.url(0) + "/view").json()
        assert after["view_id"] == status["view_id"], after
        assert nodes.alive() == [1, 2, 3, 4]


def test_with_a_secret_views_need_it_and_bad_views_are_refused() -> None:
    env = {"KV_CLUSTER_SECRET": SECRET}
    with cluster(2, None, env) as nodes, httpx.Client(timeout=30) as c:
        good = nodes.view({"A": [0, 1]})
        r = c.put(nodes.url(0) + "/view", json=good)
        assert_json_error(r, 401)
        r = c.put(nodes.url(0) + "/view", json=good, headers={"x-kv-secret": "wrong"})
        assert_json_error(r, 401)
        bad_ids = [{"A": [{"address": nodes.address(0), "id": -1}]},
                   {"A": [{"address": f"http://{nodes.address(0)}", "id": 1}]},
                   {"A": [{"address": f"{nodes.address(0)}/x", "id": 1}]},
                   {"A": [{"address": nodes.address(0), "id": "one"}]}]
        for view in bad_ids:
            r = c.put(nodes.url(0) + "/view", json={"view": view},
                      headers=secret_headers(True))
            assert_json_error(r, 400)
        assert c.get(nodes.url(0) + "/view").json()["view"] is None
        put_view_everywhere(nodes, good, range(2))
        write_and_read_everywhere(nodes, "ok")  # replication carries the secret


def test_bare_nodes_still_accept_views_and_peers() -> None:
    """No secret: the contract is unchanged (a view from anyone, peers without headers)."""
    with cluster(2, {"A": [0, 1]}) as nodes:
        write_and_read_everywhere(nodes, "bare")


def test_non_loopback_without_a_secret_warns_at_start_up() -> None:
    with cluster(1, None, host="0.0.0.0") as bare, cluster(1, None) as loopback:
        assert wait_until(lambda: "secret" in bare.log(0).lower(), 10, "a warning") >= 0
        warning = [line for line in bare.log(0).splitlines() if "secret" in line.lower()]
        assert any("WARNING" in line for line in warning), warning
        assert "secret" not in loopback.log(0).lower()


# ------------------------------------------------------------------ item 3: write ids
def test_client_write_ids_never_suppress_writes() -> None:
    with cluster(4, {"A": [0, 1], "B": [2, 3]}) as nodes, httpx.Client(timeout=30) as c:
        for i in range(4):
            tokens = {}
            for key in (f"wid{i}", "shared"):
                first = c.put(nodes.url(i) + f"/data/{key}", json={"value": "first"},
                              headers={"x-kv-write-id": "same"})
                assert first.status_code == 200, first.text
                second = c.put(nodes.url(i) + f"/data/{key}", json={
                    "value": f"second{i}", "causal-metadata": first.json()["causal-metadata"]},
                    headers={"x-kv-write-id": "same"})
                assert second.status_code == 200, second.text
                r = c.request("GET", nodes.url((i + 1) % 4) + f"/data/{key}",
                              json={"causal-metadata": second.json()["causal-metadata"]})
                assert r.json().get("value") == f"second{i}", (i, key, r.text)
                tokens[key] = second.json()["causal-metadata"]
            # with its token: the delete may reach the replica the write has not reached yet
            gone = c.request("DELETE", nodes.url(i) + f"/data/wid{i}",
                             json={"causal-metadata": tokens[f"wid{i}"]},
                             headers={"x-kv-write-id": "same"})
            assert gone.status_code == 200, gone.text
            assert c.get(nodes.url((i + 2) % 4) + f"/data/wid{i}", headers={
                "x-causal-metadata": orjson.dumps(gone.json()["causal-metadata"]).decode()
            }).status_code == 404
        # ids a forwarding node will mint, sent in advance to every owner, suppress nothing
        probe = {"sender": 1, "origin": "x", "view_id": "", "epoch": 0, "after": 0, "upto": 0,
                 "entries": [], "seen": {}, "positions": []}
        r = c.post(nodes.url(0) + "/internal/sync", json=probe)
        origin = r.json().get("origin", "1.x") if r.status_code == 200 else "1.x"
        for target in (2, 3):
            for n in range(1, 60):
                c.put(nodes.url(target) + "/data/bait", json={"value": "bait"},
                      headers={"x-kv-write-id": f"{origin}.{n}"})
        meta: Any = None
        for n in range(40):
            r = c.put(nodes.url(0) + f"/data/victim{n}",
                      json={"value": "real", "causal-metadata": meta})
            assert r.status_code == 200, r.text
            meta = r.json()["causal-metadata"]
        for n in range(40):
            r = c.request("GET", nodes.url(n % 4) + f"/data/victim{n}",
                          json={"causal-metadata": meta})
            assert r.json().get("value") == "real", (n, r.text)


# ------------------------------------------------------------------ item 4: keys . and ..
def _raw_request(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    """One request over a plain socket, the path sent exactly as given."""
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    header, _, payload = raw.partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in header.lower():
        payload = _unchunk(payload)
    return status, orjson.loads(payload) if payload else None


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def test_dot_keys_and_odd_keys_behave_the_same_through_every_node() -> None:
    keys = [".", "..", "a/b", "a b", "ü", "日本", "%", "..."]
    with cluster(4, {"A": [0, 1], "B": [2, 3]}) as nodes, httpx.Client(timeout=30) as c:
        for writer in range(4):
            meta: Any = None
            for key in keys:
                r = c.put(nodes.url(writer) + key_path(key),
                          json={"value": f"{key}@{writer}", "causal-metadata": meta})
                assert r.status_code == 200, (key, writer, r.status_code, r.text)
                meta = r.json()["causal-metadata"]
            for reader in range(4):
                for key in keys:
                    r = c.request("GET", nodes.url(reader) + key_path(key),
                                  json={"causal-metadata": meta})
                    assert r.status_code == 200, (key, writer, reader, r.text[:200])
                    assert r.json()["value"] == f"{key}@{writer}", (key, reader, r.text[:200])
            for key in keys:
                r = c.request("DELETE", nodes.url((writer + 1) % 4) + key_path(key),
                              json={"causal-metadata": meta})
                assert r.status_code == 200, (key, writer, r.text)
                meta = r.json()["causal-metadata"]
            for reader in range(4):
                for key in keys:
                    r = c.request("GET", nodes.url(reader) + key_path(key),
                                  json={"causal-metadata": meta})
                    assert r.status_code == 404, (key, reader, r.status_code, r.text[:200])
        # literal dot segments, as curl --path-as-is or a raw client sends them
        for i in range(4):
            for key in (".", ".."):
                body = orjson.dumps({"value": f"raw{key}{i}"})
                status, answer = _raw_request(nodes.ports[i], "PUT", f"/data/{key}", body)
                assert status == 200, (key, i, status, answer)
                for j in range(4):
                    status, answer = _raw_request(nodes.ports[j], "GET", f"/data/{key}",
                                                  orjson.dumps(answer))
                    assert status == 200 and answer["value"] == f"raw{key}{i}", (key, i, j,
                                                                                   answer)


# ------------------------------------------------------------------ item 5: unbounded tokens
def test_a_50000_dependency_token_is_refused_and_tokens_stay_bounded() -> None:
    env = {"KV_WAIT_DEADLINE": "2"}  # answers that would carry too big a token wait, then 503
    with cluster(3, {"A": [0, 1, 2]}, env) as nodes, httpx.Client(timeout=60) as c:
        old = wall_hlc(-3600)
        huge = {"deps": {f"made-up-{n}": [old + n, 1] for n in range(50_000)}}
        r = c.put(nodes.url(0) + "/data/k", json={"value": "v", "causal-metadata": huge})
        assert_json_error(r, 400)
        assert c.get(nodes.url(0) + "/data/k").status_code == 404
        big_header = {"deps": {f"made-up-{n}": [old + n, 1] for n in range(3000)}}  # ~100 KB
        r = c.get(nodes.url(1) + "/data/k",
                  headers={"x-causal-metadata": orjson.dumps(big_header).decode()})
        assert_json_error(r, 400, 431)
        over = {"deps": {f"d{n}": [old + n, 1] for n in range(MAX_TOKEN_DEPS + 1)}}
        r = c.put(nodes.url(0) + "/data/k", json={"value": "v", "causal-metadata": over})
        assert_json_error(r, 400)
        # tokens at the limit are taken; nothing a node hands out, in any answer, is over it
        handed_out: list[Any] = []
        for part in range(3):
            deps = {f"p{part}-{n}-".ljust(100, "x"): [old + n, 2] for n in range(200)}
            token = {"deps": deps}
            assert len(orjson.dumps(token)) <= MAX_TOKEN_BYTES
            r = c.put(nodes.url(part) + f"/data/wide{part}",
                      json={"value": "v", "causal-metadata": token})
            assert r.status_code == 200, r.text[:300]
            handed_out.append(r.json()["causal-metadata"])
        for part in range(3):  # a fresh session reads each such key, once replicated there
            for reader in range(3):
                deadline = time.monotonic() + 10
                while (r := c.get(nodes.url(reader) + f"/data/wide{part}")).status_code == 404:
                    assert time.monotonic() < deadline, "never replicated"
                    time.sleep(0.05)
                assert r.status_code == 200, r.text[:300]
                handed_out.append(r.json()["causal-metadata"])
                header = {"x-causal-metadata": orjson.dumps(handed_out[-1]).decode()}
                r = c.get(nodes.url((reader + 1) % 3) + f"/data/wide{part}", headers=header)
                assert r.status_code == 200, r.text[:300]  # and its token is taken back
        meta: Any = None
        for part in range(3):  # one session reading them all: bounded answers, never over
            for reader in range(3):
                r = c.request("GET", nodes.url(reader) + f"/data/wide{part}",
                              json={"causal-metadata": meta})
                assert r.status_code in (200, 503), r.text[:300]
                handed_out.append(r.json()["causal-metadata"])
                if r.status_code == 200:
                    meta = r.json()["causal-metadata"]
        r = c.put(nodes.url(0) + "/data/last", json={"value": "v", "causal-metadata": meta})
        assert r.status_code == 200, r.text[:300]
        handed_out.append(r.json()["causal-metadata"])
        handed_out.append(c.get(nodes.url(0) + "/data").json()["causal-metadata"])
        for token in handed_out:
            assert len(orjson.dumps(token)) <= MAX_TOKEN_BYTES
            assert len(token.get("deps", {})) <= MAX_TOKEN_DEPS


def test_oversized_headers_get_a_json_431() -> None:
    with cluster(1, {"A": [0]}) as nodes, httpx.Client(timeout=30) as c:
        r = c.get(nodes.url(0) + "/data/k", headers={"x-filler": "f" * (100 << 10)})
        assert_json_error(r, 431)
        assert nodes.alive() == [1]


# ------------------------------------------------------------------ item 6: big values
def _big_value(key: str, n: int) -> str:
    if n % 8 == 0:  # control characters: each is 6 bytes of JSON (\u0001)
        return "\x01" * (900 << 10)
    return (key + ":" + "v" * (900 << 10))[: 900 << 10]


@pytest.mark.parametrize("shape", ["1-to-2", "2-to-3"])
def test_thirty_900_kib_values_reshard_without_loss(shape: str) -> None:
    if shape == "1-to-2":
        old_shards, new_shards, n = {"A": [0, 1]}, {"A": [0, 1], "B": [2, 3]}, 4
    else:
        old_shards = {"A": [0, 1], "B": [2, 3]}
        new_shards, n = {"A": [0, 1], "B": [2, 3], "C": [4, 5]}, 6
    with cluster(n, None, {"KV_WAIT_DEADLINE": "30"}) as nodes, httpx.Client(timeout=60) as c:
        old_body, new_body = nodes.view(old_shards), nodes.view(new_shards)
        put_view_everywhere(nodes, old_body, range(n))
        old, new = parse_view(old_body), parse_view(new_body)
        target = "B" if shape == "1-to-2" else "C"
        moving = [k for k in (f"big{i}" for i in range(400))
                  if old.shard_for(k) != new.shard_for(k) and new.shard_for(k) == target]
        staying = [k for k in (f"big{i}" for i in range(400))
                   if old.shard_for(k) == new.shard_for(k)]
        keys = moving[:18] + staying[:12]  # 18 x 900 KiB to one shard: over a 12 MiB body
        values = {k: _big_value(k, n) for n, k in enumerate(keys)}
        for n_, (k, v) in enumerate(values.items()):
            r = c.put(nodes.url(n_ % len(old_body["view"]) * 2) + f"/data/{k}",
                      json={"value": v})
            assert r.status_code == 200, r.text[:300]
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(
                lambda i: httpx.put(nodes.url(i) + "/view", json=new_body, timeout=120),
                range(n)))
        took = time.monotonic() - started
        for r in answers:  # done, or a clean "still changing" within the deadline
            assert r.status_code in (200, 503), (r.status_code, r.text[:300])
            assert isinstance(r.json(), dict)
        assert took < 60, f"PUT /view took {took:.1f}s"

        def all_there() -> bool:
            union: dict[str, str] = {}
            for shard, members in new_shards.items():
                for i in members:
                    got = c.get(nodes.url(i) + "/data", timeout=60)
                    if got.status_code != 200:
                        return False
                    items = got.json()["items"]
                    if any(new.shard_for(k) != shard for k in items):
                        return False
                    union.update(items)
            return {k: union.get(k) for k in keys} == values

        wait_until(all_there, 120, "every value at its new owners")
        for n_, k in enumerate(keys):
            r = c.get(nodes.url(n_ % n) + f"/data/{k}")
            assert r.status_code == 200 and r.json()["value"] == values[k], (k, r.text[:200])
        assert len(nodes.alive()) == n


# ------------------------------------------------------------------ item 7: failures
GARBAGE = [b"[]", b"{}", b'{"entries": 5, "next": {}}', b'{"origin": [], "seen": "x"}',
           b"not json", b'{"view_id": 7, "change": 5, "view": 3, "epoch": "x"}',
           b'{"entries": [[1, 2, 3]], "next": null, "report": 7}', b"null", b'"text"',
           b'{"accepted": true, "seen": 1e999, "origin": "x", "view_id": "", "epoch": -1}']


@contextmanager
def garbage_peer() -> Iterator[str]:
    """An HTTP server answering every request with 200 and a body of the wrong shape."""
    count = iter(range(10**9))

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            body = GARBAGE[next(count) % len(GARBAGE)]
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_peer_answering_garbage_kills_no_node() -> None:
    env = {"KV_PUT_VIEW_TIMEOUT": "5", "KV_VIEW_CHANGE_DEADLINE": "4"}
    with garbage_peer() as liar, cluster(3, None, env) as nodes, httpx.Client(timeout=60) as c:
        # the liar is a replica of node 1's shard and an old owner in the next change
        first = nodes.view({"A": [0], "B": [1, 2]}, extra={"A": [(9, liar)]})
        put_view_everywhere(nodes, first, range(3))
        for n in range(6):  # some are forwarded to the liar, which answers garbage
            r = c.put(nodes.url(n % 3) + f"/data/g{n}", json={"value": str(n)})
            assert r.status_code in (200, 503), r.text
        second = nodes.view({"A": [0, 1], "B": [2]}, extra={"C": [(9, liar)]})
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(
                lambda i: httpx.put(nodes.url(i) + "/view", json=second, timeout=120),
                range(3)))
        took = time.monotonic() - started
        for r in answers:  # within put_view_timeout: done, or a JSON "still changing"
            assert r.status_code in (200, 503), (r.status_code, r.text[:200])
            assert isinstance(r.json(), dict)
        assert took < 5 + 5, f"PUT /view took {took:.1f}s (put_view_timeout 5 s)"
        time.sleep(3)  # senders, pulls, handoffs and fence probes all talk to the liar
        assert nodes.alive() == [1, 2, 3], [nodes.log(i)[-2000:] for i in range(3)]
        before, view = parse_view(first), parse_view(second)
        # keys the liar never held (it may keep its own former keys waiting, as an
        # unreachable old owner would) serve as ever
        keys = [k for k in (f"after{n}" for n in range(400))
                if before.shard_for(k) == "B" and view.shard_for(k) != "C"][:10]
        meta: Any = None
        for n, key in enumerate(keys):
            r = c.put(nodes.url(n % 3) + f"/data/{key}", json={"value": key,
                                                               "causal-metadata": meta})
            assert r.status_code == 200, r.text
            meta = r.json()["causal-metadata"]
        for n, key in enumerate(keys):
            r = c.request("GET", nodes.url((n + 1) % 3) + f"/data/{key}",
                          json={"causal-metadata": meta})
            assert r.status_code == 200 and r.json()["value"] == key, r.text
        assert nodes.alive() == [1, 2, 3]


@pytest.mark.parametrize(("setting", "value"), [
    ("KV_WAIT_DEADLINE", "soon"), ("KV_MAX_VALUE_BYTES", "-1"), ("KV_BATCH_BYTES", "-5"),
    ("KV_PEER_TIMEOUT", "nan"), ("--max-request-bytes", "lots"), ("--handoff-batch-entries", "-3"),
])
def test_a_bad_setting_exits_2_with_one_line(setting: str, value: str) -> None:
    env = {**os.environ, "NODE_IDENTIFIER": "1"}
    args = [sys.executable, "-m", "trio_kv", "--host", "127.0.0.1", "--port",
            str(_free_ports(1)[0])]
    if setting.startswith("--"):
        args += [setting, value]
    else:
        env[setting] = value
    done = subprocess.run(args, env=env, capture_output=True, timeout=30, text=True)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(lines) == 1, lines
    name = setting.removeprefix("--").removeprefix("KV_").replace("-", "_").lower()
    assert name in lines[0].lower().replace("-", "_"), lines


# ------------------------------------------------------------------ slow clients
def test_a_half_sent_request_is_dropped_by_the_read_timeout() -> None:
    with cluster(1, {"A": [0]}, {"KV_READ_TIMEOUT": "2"}) as nodes:
        with socket.create_connection(("127.0.0.1", nodes.ports[0]), timeout=15) as s:
            s.sendall(b"PUT /data/x HTTP/1.1\r\nHost: a\r\ncontent-type: application/json\r\n"
                      b"content-length: 100\r\n\r\n{\"value\":")
            started = time.monotonic()
            received = b""
            try:
                while chunk := s.recv(65536):  # the server answers (408) and/or closes
                    received += chunk
            except TimeoutError:
                raise AssertionError("a half-sent request held its connection 15 s") from None
            waited = time.monotonic() - started
        assert waited < 15, waited
        assert not received or b" 408 " in received.split(b"\r\n", 1)[0] or b" 400 " in \
            received.split(b"\r\n", 1)[0], received[:200]
        assert httpx.get(nodes.url(0) + "/data/x", timeout=10).status_code == 404
