"""The bad-input tier: hypothesis-generated hostile requests against a live in-process cluster.

Every generated request is sent to a running 2-shard cluster (2 nodes each) and must get a
JSON answer below 500; every rejection must have the status its kind calls for, and must leave
the data (``GET /data`` on every node) and every node's view as they were.  After each example
the cluster must still work: no background task failed (``Node.task_failures == 0``),
replication and forwarding still deliver a write made through any node.

Examples are batches of requests so one cluster serves several; each example runs its own trio
run on an autojump clock.  Clusters run with and without a cluster secret, and requests are
sent with and without it.

Paths are percent-encoded with ``quote(key, safe="")``; keys that are dot segments (``.`` and
``..``) are sent as ``%2E`` and ``%2E%2E``, because httpx removes dot segments from a URL but
keeps their percent-encoded form in the raw path the node reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from trio_kv.config import Config
from trio_kv.testing import Cluster, open_cluster

SECRET = "hostile-tier-secret"
SHARDS = {"A": 2, "B": 2}
NODES = [1, 2, 3, 4]
MAX_HOPS = Config().max_hops
# Timestamps (hybrid clock: ms << 16) a day ahead of any node's wall clock: always refused.
FUTURE = (time.time_ns() // 1_000_000 + 86_400_000) << 16
PAST = (time.time_ns() // 1_000_000 - 86_400_000) << 16
ASCII = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
# Passing examples take ~30 ms each (a fresh cluster on an autojump clock).  No shrinking: a
# failing example is a short list of requests, readable as generated, and shrinking one took
# minutes (every candidate runs a cluster); one bug per test is reported.
EXAMPLES = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
    report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
)


def key_path(key: str) -> str:
    """The raw path of a key: one percent-encoded segment (dot segments as %2E)."""
    quoted = quote(key, safe="")
    if quoted in (".", ".."):
        quoted = quoted.replace(".", "%2E")
    return "/data/" + quoted


def encode(obj: Any) -> bytes:
    """JSON with every non-ASCII character escaped (lone surrogates included)."""
    return json.dumps(obj, ensure_ascii=True).encode()


@dataclasses.dataclass
class Probe:
    """One hostile request and what it must get."""

    what: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    expect: frozenset[int] = frozenset({400})
    node: int = 1
    secret: bool = False  # send the cluster secret with it
    protected: bool = False  # PUT /view or /internal/*: 401 without the secret when one is set
    not_accepted: bool = False  # a 200 must say "accepted": false (a refused sync)


# ---------------------------------------------------------------------------- strategies
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
json_any = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

bad_timestamp = st.one_of(
    st.integers(min_value=FUTURE, max_value=2**64 + 5),
    st.sampled_from([2**63, 2**64 - 1, 2**63 - 1, FUTURE]),
    st.integers(max_value=-1),
    st.floats(), st.text(max_size=5), st.none(), st.booleans(), st.lists(st.integers(), max_size=2),
)
bad_node_id = st.one_of(
    st.integers(max_value=-1), st.floats(), st.text(max_size=5), st.none(), st.booleans(),
    st.integers(min_value=2**63, max_value=2**70),
)
good_pair = st.tuples(st.integers(min_value=0, max_value=PAST), st.integers(1, 4)).map(list)


@st.composite
def bad_tokens(draw: st.DrawFn) -> Any:
    """A causal-metadata value every node must refuse with 400."""
    kind = draw(st.sampled_from(
        ["not-object", "extra-field", "deps-not-object", "bad-ts", "bad-node", "bad-pair",
         "too-many", "too-big"]))
    key = draw(st.text(max_size=10))
    if kind == "not-object":
        return draw(st.one_of(st.lists(json_any, max_size=3), st.integers(), st.text(max_size=9),
                              st.booleans(), st.floats(allow_nan=False)))
    if kind == "extra-field":
        return {"deps": {}, draw(st.text(min_size=1, max_size=8).filter(lambda s: s != "deps")):
                draw(json_any)}
    if kind == "deps-not-object":
        return {"deps": draw(st.one_of(st.lists(json_any, max_size=3), st.integers(),
                                       st.text(max_size=5)))}
    if kind == "bad-ts":
        return {"deps": {key: [draw(bad_timestamp), draw(st.integers(1, 4))]}}
    if kind == "bad-node":
        return {"deps": {key: [draw(st.integers(0, PAST)), draw(bad_node_id)]}}
    if kind == "bad-pair":
        return {"deps": {key: draw(st.one_of(
            st.lists(st.integers(0, 10), max_size=1), st.lists(st.integers(0, 10), min_size=3,
                                                               max_size=5),
            json_leaf, st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))}}
    if kind == "too-many":  # more than max_token_deps (256), every pair well formed
        count = draw(st.integers(257, 600))
        return {"deps": {f"d{i}": [1 + i, 1] for i in range(count)}}
    # too-big: under 256 deps but over max_token_bytes (32 KiB) of encoded JSON
    count = draw(st.integers(40, 60))
    return {"deps": {f"{i}".ljust(1000, "x"): [1, 1] for i in range(count)}}


def _int_in(text: str, low: int, high: int) -> bool:
    try:
        return low <= int(text) <= high
    except ValueError:
        return False


def _budget_ok(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and value >= 0


bad_hops = st.one_of(
    st.integers(max_value=-1).map(str), st.integers(min_value=MAX_HOPS + 1).map(str),
    st.sampled_from(["", "abc", "1.5", "nan", "0x1", "1e2", "9" * 40]),
    st.text(ASCII, max_size=12),
).filter(lambda s: not _int_in(s, 0, MAX_HOPS))
bad_budget = st.one_of(
    st.floats(max_value=-1e-9).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "-1", "", "abc", "NaN", "Infinity"]),
    st.text(ASCII, max_size=12),
).filter(lambda s: not _budget_ok(s))
bad_write_id = st.integers(4097, 16384).map(lambda n: "w" * n)


@st.composite
def token_probes(draw: st.DrawFn) -> Probe:
    """A data request carrying a bad token, in the body or (GET) in the header."""
    token = draw(bad_tokens())
    method = draw(st.sampled_from(["PUT", "GET", "DELETE", "GET-header", "GET-all"]))
    key = draw(st.sampled_from(["x", "y", "k1"]))
    node = draw(st.sampled_from(NODES))
    if method == "GET-header":
        return Probe("token in header", "GET", key_path(key),
                     headers={"x-causal-metadata": encode(token).decode()}, node=node,
                     expect=frozenset({400, 431}))
    if method == "GET-all":
        return Probe("token on GET /data", "GET", "/data",
                     body=encode({"causal-metadata": token}), node=node)
    body: dict[str, Any] = {"causal-metadata": token}
    if method == "PUT":
        body["value"] = "must-not-be-written"
    return Probe(f"token on {method}", method, key_path(key), body=encode(body), node=node)


@st.composite
def header_probes(draw: st.DrawFn) -> Probe:
    """A write with one malformed node-only header: refused, never applied."""
    name, value = draw(st.one_of(
        st.tuples(st.just("x-kv-hops"), bad_hops),
        st.tuples(st.just("x-kv-budget"), bad_budget),
        st.tuples(st.just("x-kv-write-id"), bad_write_id),
    ))
    method = draw(st.sampled_from(["PUT", "DELETE", "GET"]))
    body = encode({"value": "must-not-be-written"}) if method == "PUT" else None
    return Probe(f"{name}={value[:20]!r}", method, key_path(draw(st.sampled_from(["x", "y"]))),
                 body=body, headers={name: value}, node=draw(st.sampled_from(NODES)),
                 secret=draw(st.booleans()))


@st.composite
def key_probes(draw: st.DrawFn) -> Probe:
    """Keys no node may accept: too long, not UTF-8, empty, more than one segment."""
    kind = draw(st.sampled_from(["long", "utf8", "empty", "slash"]))
    node = draw(st.sampled_from(NODES))
    method = draw(st.sampled_from(["PUT", "GET", "DELETE"]))
    body = encode({"value": "must-not-be-written"}) if method == "PUT" else None
    if kind == "long":
        path = key_path("k" * draw(st.integers(1025, 3000)))
    elif kind == "utf8":
        path = "/data/" + draw(st.sampled_from(["%FF", "%C3", "a%80b", "%ED%A0%80"]))
    elif kind == "empty":
        path = "/data/"
    else:
        path = "/data/" + draw(st.sampled_from(["a/b", "x/", "/x", "a//b"]))
    return Probe(f"key {kind}", method, path, body=body, node=node,
                 expect=frozenset({400}) if kind != "empty" else frozenset({400, 404, 405}))


@st.composite
def body_probes(draw: st.DrawFn) -> Probe:
    """Data request bodies no node may accept: not JSON, not an object, a value that is not a
    string or is too large."""
    kind = draw(st.sampled_from(["not-json", "not-object", "value", "no-value", "too-big"]))
    method = draw(st.sampled_from(["PUT", "GET", "DELETE"])) if kind in (
        "not-json", "not-object") else "PUT"
    expect = frozenset({400})
    if kind == "not-json":
        body = draw(st.binary(min_size=1, max_size=40).filter(lambda b: not _is_json(b)))
    elif kind == "not-object":
        body = encode(draw(json_any.filter(lambda v: not isinstance(v, dict))))
    elif kind == "value":
        body = encode({"value": draw(json_any.filter(lambda v: not isinstance(v, str)))})
    elif kind == "no-value":
        body = encode(draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k != "value"),
                                           json_leaf, max_size=3)))
    else:
        body = encode({"value": "v" * (Config().max_value_bytes + draw(st.integers(1, 4096)))})
        expect = frozenset({413})
    return Probe(f"body {kind}: {body[:60]!r}", method, key_path(draw(st.sampled_from(["x", "y"]))),
                 body=body, node=draw(st.sampled_from(NODES)), expect=expect)


def _base_view(addresses: dict[int, str]) -> dict[str, Any]:
    return {"A": [{"address": addresses[i], "id": i} for i in (1, 2)],
            "B": [{"address": addresses[i], "id": i} for i in (3, 4)]}


@st.composite
def view_bodies(draw: st.DrawFn, addresses: dict[int, str]) -> tuple[str, Any]:
    """The cluster's own view with exactly one defect."""
    view = _base_view(addresses)
    shard = draw(st.sampled_from(["A", "B"]))
    member = view[shard][draw(st.integers(0, 1))]
    kind = draw(st.sampled_from(["id", "address", "member", "shard", "body", "duplicate"]))
    if kind == "id":
        member["id"] = draw(st.one_of(
            st.integers(max_value=-1), st.floats(), st.booleans(), st.none(),
            st.sampled_from(["-1", "one", "1.5", "", " ", "0x2", "1e3"]),
            st.lists(st.integers(), max_size=2),
        ))
    elif kind == "address":
        host = member["address"]
        member["address"] = draw(st.one_of(
            st.sampled_from([f"http://{host}", f"{host}/path", f"{host}/", host.split(":")[0],
                             f"{host.split(':')[0]}:port", f":{host.split(':')[1]}", "",
                             f"https://{host}/x", f"{host}?q=1", f"user@{host}",
                             f"{host.split(':')[0]}:0", f"{host.split(':')[0]}:70000"]),
            st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2),
        ))
    elif kind == "member":
        view[shard][0] = draw(st.one_of(json_leaf, st.just({"id": member["id"]}),
                                        st.just({"address": member["address"]})))
    elif kind == "shard":
        view[shard] = draw(st.one_of(st.just([]), json_leaf, st.dictionaries(
            st.text(max_size=3), st.integers(), max_size=2)))
    elif kind == "body":
        return kind, draw(st.one_of(json_leaf, st.lists(json_any, max_size=2), st.just({}),
                                    st.just({"view": {}}), st.just({"view": []})))
    else:
        other = view["B" if shard == "A" else "A"][0]
        member["id"] = other["id"]
    return kind, {"view": view}


@st.composite
def view_probes(draw: st.DrawFn, addresses: dict[int, str]) -> Probe:
    kind, body = draw(view_bodies(addresses))
    return Probe(f"view {kind}: {str(body)[:120]}", "PUT", "/view", body=encode(body),
                 node=draw(st.sampled_from(NODES)), secret=draw(st.booleans()), protected=True)


@st.composite
def unauthorised_view_probes(draw: st.DrawFn, addresses: dict[int, str]) -> Probe:
    """A well-formed view that moves every node: with a secret set, refused without it."""
    view = _base_view(addresses)
    view = {"A": view["B"], "B": view["A"], "C": [{"address": "10.9.9.9:1", "id": 9}]}
    return Probe("valid view without the secret", "PUT", "/view", body=encode({"view": view}),
                 node=draw(st.sampled_from(NODES)), secret=False, protected=True,
                 expect=frozenset({401}))


# Peer messages: garbage, and real shapes with one field wrong.  Forged ones that need live
# state (view id, origins) are built by ``forge`` at run time from a drawn recipe.
@st.composite
def garbage_peer_probes(draw: st.DrawFn) -> Probe:
    route = draw(st.sampled_from(["sync", "handoff", "pull", "stable"]))
    fields = {"sync": ["sender", "origin", "view_id", "epoch", "after", "upto", "entries", "seen",
                       "positions"],
              "handoff": ["entries", "from", "epoch", "view_id"],
              "stable": ["from", "deps"],
              "pull": ["view", "within", "after", "limit", "from", "epoch"]}[route]
    body = draw(st.one_of(
        json_any.filter(lambda v: not isinstance(v, dict)),
        st.fixed_dictionaries({f: json_any for f in fields}),
        st.binary(max_size=40).filter(lambda b: not _is_json(b)),
    ))
    raw = body if isinstance(body, bytes) else encode(body)
    plain_garbage = not isinstance(body, dict)
    return Probe(f"{route} garbage {raw[:80]!r}", "POST", f"/internal/{route}", body=raw,
                 node=draw(st.sampled_from(NODES)), secret=draw(st.booleans()), protected=True,
                 expect=frozenset({400}) if plain_garbage else frozenset({200, 400}))


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return not raw.strip()  # an empty body is "no body", not garbage JSON
    return True


FORGERIES = [
    "sync-future-ts", "sync-huge-ts", "sync-overclaim", "sync-stranger", "sync-oversized",
    "sync-bad-positions", "handoff-future-ts", "handoff-huge-ts", "handoff-stranger",
    "handoff-oversized", "handoff-bad-entry", "pull-invented-view", "pull-stranger",
    "pull-hijack-addresses", "pull-bad-limit", "stable-future-ts", "stable-huge-ts",
    "stable-oversized", "stable-bad-key",
]


@dataclasses.dataclass
class Forgery:
    kind: str
    node: int
    secret: bool
    number: int


forgeries = st.builds(Forgery, st.sampled_from(FORGERIES), st.sampled_from(NODES), st.booleans(),
                      st.integers(0, 2**16))


def forge(cluster: Cluster, f: Forgery) -> Probe:
    """A peer message that looks like the real thing but must be refused."""
    node = cluster.nodes[f.node]
    view = node.replica.view
    assert view is not None
    shard = view.shard_of(f.node)
    assert shard is not None
    peer = next(m.id for m in view.shards[shard] if m.id != f.node)
    route, _, what = f.kind.partition("-")
    # a handoff injects a key nobody wrote (so an accepted one shows); the rest touch a seed key
    prefix = "forged" if route == "handoff" else "fk"
    key = next(f"{prefix}{i}" for i in range(1000) if view.shard_for(f"{prefix}{i}") == shard)
    now = (time.time_ns() // 1_000_000) << 16
    ts = {"future-ts": FUTURE + f.number, "huge-ts": 2**63 + f.number}.get(what, now + f.number)
    value = "x" * (Config().max_value_bytes + 1 + f.number) if what == "oversized" else "forged"
    entry: list[Any] = [key, value, ts, peer, None]
    sender = 99 + f.number if what == "stranger" else peer
    secret = f.secret
    if route == "handoff" and what == "stranger":
        # Only the secret tells peers from strangers for handoffs (a fresh node replacing a
        # whole cluster knows none of the old owners handing it keys): with a secret set, an
        # unknown sender without it is refused; bare, a malformed sender id is.
        if cluster.config.cluster_secret:
            secret = False
        else:
            sender = -1 - f.number
    # Refused: a 4xx, or (sync) an answer that does not accept it.  A pull from a node in no
    # view we know may be answered (a node sent a newer view first pulls before we have it),
    # but must change nothing and hijack nothing.
    expect = frozenset({400, 403, 409, 413})
    if route == "pull" and what in ("stranger", "invented-view"):
        expect |= {200}
    body: dict[str, Any]
    if route == "stable":  # "which of these are stable?": refused whole, answers nothing
        deps = [[key if what != "bad-key" else "", ts, peer]]
        if what == "oversized":
            deps *= Config().stable_query_deps + 1 + f.number % 5
        body = {"from": peer, "deps": deps}
    elif route == "sync":
        expect |= {200}
        body = {
            "sender": sender, "origin": f"{sender}.forged", "view_id": view.view_id,
            "epoch": node.replica.epoch, "after": 0, "upto": 1, "entries": [entry],
            "seen": {}, "positions": [1],
        }
        if what == "overclaim":  # claims to have seen far more of our stream than we sent
            body["entries"], body["positions"], body["upto"] = [], [], 0
            body["seen"] = {node.replica.origin: 10**9 + f.number}
        if what == "bad-positions":
            body["positions"] = [-1 - f.number, 5]
    elif route == "handoff":
        if what == "bad-entry":
            entry = [key, "forged", ts, -1 - f.number, {"k": "not a pair"}]
        body = {"entries": [entry], "from": sender, "epoch": node.replica.epoch,
                "view_id": view.view_id}
    else:
        invented = {"A": [{"address": f"10.66.0.{i}:666", "id": 90 + i} for i in (1, 2)]}
        if what == "hijack-addresses":  # our members, at addresses the sender chose
            invented = {name: [{"address": f"10.66.0.{m.id}:666", "id": m.id} for m in ms]
                        for name, ms in view.shards.items()}
        elif what in ("stranger", "bad-limit"):
            invented = view.to_json()
        within = [[invented, next(iter(invented))]]
        body = {"view": invented, "within": within, "after": "",
                "limit": -5 - f.number if what == "bad-limit" else 10,
                "from": sender if what != "invented-view" else 91,
                "epoch": node.replica.epoch + 1000 + f.number}
        if what == "stranger":
            body["from"] = 99 + f.number
    return Probe(f"forged {f.kind}", "POST", f"/internal/{route}", body=encode(body),
                 node=f.node, secret=secret, protected=True, expect=expect,
                 not_accepted=route == "sync")


# ---------------------------------------------------------------------------- the harness
Snapshot = tuple[dict[int, dict[str, str]], dict[int, str | None]]


async def snapshot(cluster: Cluster) -> Snapshot:
    """Every node's listing and view id."""
    data: dict[int, dict[str, str]] = {}
    for i in NODES:
        async with cluster.client(i) as c:
            r = await c.get("/data")
            assert r.status_code == 200, r.text
            data[i] = r.json()["items"]
    return data, {i: n.replica.view.view_id if n.replica.view else None
                  for i, n in cluster.nodes.items()}


async def settled_snapshot(cluster: Cluster) -> Snapshot:
    """A snapshot once both replicas of each shard list the same items."""
    with trio.fail_after(30):
        while True:
            snap = await snapshot(cluster)
            if snap[0][1] == snap[0][2] and snap[0][3] == snap[0][4]:
                return snap
            await trio.sleep(0.1)


def assert_healthy(cluster: Cluster) -> None:
    for i, node in cluster.nodes.items():
        failures = getattr(node, "task_failures", None)
        assert failures == 0, f"node {i}: task_failures={failures!r} (must exist and be 0)"


async def send(cluster: Cluster, probe: Probe) -> httpx.Response:
    async with cluster.client(probe.node, secret=probe.secret) as c:
        headers = dict(probe.headers)
        if probe.body is not None:
            headers.setdefault("content-type", "application/json")
        return await c.request(probe.method, probe.path, content=probe.body, headers=headers)


def expected(cluster: Cluster, probe: Probe) -> frozenset[int]:
    if probe.protected and cluster.config.cluster_secret and not probe.secret:
        return frozenset({401})
    return probe.expect


async def check_probe(cluster: Cluster, probe: Probe, before: Snapshot) -> None:
    r = await send(cluster, probe)
    where = f"{probe.what}: {probe.method} {probe.path[:80]} -> {r.status_code} {r.text[:300]}"
    assert r.status_code < 500, where
    try:
        body = r.json()
    except ValueError:
        raise AssertionError(f"answer is not JSON: {where}") from None
    assert isinstance(body, dict), where
    assert r.status_code in expected(cluster, probe), where
    if r.status_code >= 400:
        assert isinstance(body.get("error"), str) and body["error"], where
    if probe.not_accepted and r.status_code == 200:
        assert body.get("accepted") is False, where
    assert_healthy(cluster)
    after = await snapshot(cluster)
    assert after == before, f"a refused request changed data or views: {where}"


async def still_works(cluster: Cluster, tag: str) -> None:
    """A write through each node reaches both replicas of its shard; reads through every node
    (owner or not) return it: senders, forwarding and views survived the example."""
    meta: Any = None
    written: dict[str, str] = {}
    for i in NODES:
        key = f"{tag}-via{i}"
        async with cluster.client(i) as c:
            r = await c.put(key_path(key), json={"value": key, "causal-metadata": meta})
            assert r.status_code == 200, f"write through node {i} after the probes: {r.text}"
            meta = r.json()["causal-metadata"]
            written[key] = key
    for i in NODES:
        async with cluster.client(i) as c:
            for key, value in written.items():
                r = await c.request("GET", key_path(key), json={"causal-metadata": meta})
                assert r.status_code == 200 and r.json()["value"] == value, (i, key, r.text)
    snap = await settled_snapshot(cluster)
    listed = {**snap[0][1], **snap[0][3]}
    assert written.items() <= listed.items()
    assert_healthy(cluster)


def run_in_cluster(
    secret: bool, body: Callable[[Cluster], Awaitable[None]], config: Config | None = None
) -> None:
    """One example: a fresh seeded cluster on an autojump clock."""
    cfg = config or Config()
    if secret:
        cfg = dataclasses.replace(cfg, cluster_secret=SECRET)

    async def main() -> None:
        async with open_cluster(SHARDS, config=cfg) as cluster:
            meta: Any = None
            async with cluster.client(1) as c:
                for key in ("x", "y", "k1", "k2", "fk0", "fk1"):
                    r = await c.put(key_path(key), json={"value": f"seed-{key}",
                                                          "causal-metadata": meta})
                    assert r.status_code == 200, r.text
                    meta = r.json()["causal-metadata"]
            await body(cluster)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def probe_all(cluster: Cluster, probes: list[Probe]) -> None:
    before = await settled_snapshot(cluster)
    for probe in probes:
        await check_probe(cluster, probe, before)
    await still_works(cluster, "after")


# ---------------------------------------------------------------------------- the tests
WITH_AND_WITHOUT_SECRET = pytest.mark.parametrize("secret", [False, True],
                                                  ids=["bare", "secret"])


@WITH_AND_WITHOUT_SECRET
@EXAMPLES
@given(probes=st.lists(st.one_of(token_probes(), header_probes(), key_probes(), body_probes()),
                       min_size=1, max_size=6))
def test_bad_client_requests_are_refused_and_change_nothing(secret: bool,
                                                            probes: list[Probe]) -> None:
    run_in_cluster(secret, lambda cluster: probe_all(cluster, probes))


ADDRESSES = {i: f"10.0.0.{i}:8081" for i in NODES}  # as trio_kv.testing places nodes


@WITH_AND_WITHOUT_SECRET
@EXAMPLES
@given(probes=st.lists(st.one_of(view_probes(ADDRESSES), unauthorised_view_probes(ADDRESSES)),
                       min_size=1, max_size=6))
def test_bad_views_are_refused_and_change_nothing(secret: bool, probes: list[Probe]) -> None:
    def fix(probe: Probe) -> Probe:
        # a well-formed view sent without the secret to a bare node is a legitimate view
        # change; only the secret-protected cluster must refuse it
        return probe if secret or probe.expect != frozenset({401}) else dataclasses.replace(
            probe, expect=frozenset({400}), body=encode({"view": {"A": []}}))

    run_in_cluster(secret, lambda cluster: probe_all(cluster, [fix(p) for p in probes]))


@WITH_AND_WITHOUT_SECRET
@EXAMPLES
@given(garbage=st.lists(garbage_peer_probes(), max_size=4),
       forged=st.lists(forgeries, max_size=4))
def test_malformed_and_forged_peer_messages_are_refused(secret: bool, garbage: list[Probe],
                                                        forged: list[Forgery]) -> None:
    async def body(cluster: Cluster) -> None:
        await probe_all(cluster, [*garbage, *(forge(cluster, f) for f in forged)])

    run_in_cluster(secret, body)


UNUSUAL_KEYS = [".", "..", "...", "a/b", " ", "a b", "ü", "日本語", "%", "%2F", "?", "#", "+",
                "a?b=c", "~", "-", "é/..", "a\nb", "\t"]
keys = st.one_of(st.sampled_from(UNUSUAL_KEYS), st.text(min_size=1, max_size=30)).filter(
    lambda k: len(k.encode("utf-8", "surrogatepass")) <= 1024 and _utf8(k))


def _utf8(key: str) -> bool:
    try:
        key.encode()
    except UnicodeEncodeError:
        return False
    return True


@WITH_AND_WITHOUT_SECRET
@EXAMPLES
@given(batch=st.lists(st.tuples(keys, st.sampled_from(NODES), st.sampled_from(NODES)),
                      min_size=1, max_size=5, unique_by=lambda t: t[0]))
def test_every_allowed_key_behaves_the_same_at_its_owner_and_through_others(
    secret: bool, batch: list[tuple[str, int, int]]
) -> None:
    """PUT through one node, GET through every node, DELETE through another, GET again."""

    async def body(cluster: Cluster) -> None:
        meta: Any = None
        for key, writer, _ in batch:
            async with cluster.client(writer) as c:
                r = await c.put(key_path(key), json={"value": f"v:{key}",
                                                     "causal-metadata": meta})
                assert r.status_code == 200, (key, writer, r.status_code, r.text)
                meta = r.json()["causal-metadata"]
        for i in NODES:
            async with cluster.client(i) as c:
                for key, _, _ in batch:
                    r = await c.request("GET", key_path(key), json={"causal-metadata": meta})
                    assert r.status_code == 200, (key, i, r.status_code, r.text)
                    assert r.json().get("value") == f"v:{key}", (key, i, r.text)
        snap = await settled_snapshot(cluster)
        listed = {**snap[0][1], **snap[0][3]}
        for key, _, _ in batch:
            assert listed.get(key) == f"v:{key}", (key, listed)
        for key, _, deleter in batch:
            async with cluster.client(deleter) as c:
                r = await c.request("DELETE", key_path(key), json={"causal-metadata": meta})
                assert r.status_code == 200, (key, deleter, r.status_code, r.text)
                meta = r.json()["causal-metadata"]
        for i in NODES:
            async with cluster.client(i) as c:
                for key, _, _ in batch:
                    r = await c.request("GET", key_path(key), json={"causal-metadata": meta})
                    assert r.status_code == 404, (key, i, r.status_code, r.text)
        assert_healthy(cluster)

    run_in_cluster(secret, body)


# ---------------------------------------------------------------------------- directed cases
def test_a_client_write_id_never_suppresses_a_different_write() -> None:
    """Issue 9 item 3: two different writes under the same client-chosen id both apply."""

    async def body(cluster: Cluster) -> None:
        for node in NODES:  # owner and non-owner alike
            key = f"wid{node}"
            async with cluster.client(node) as c:
                r1 = await c.put(key_path(key), json={"value": "first"},
                                 headers={"x-kv-write-id": "same-id"})
                assert r1.status_code == 200, r1.text
                r2 = await c.put(key_path(key), json={
                    "value": "second", "causal-metadata": r1.json()["causal-metadata"]},
                    headers={"x-kv-write-id": "same-id"})
                assert r2.status_code == 200, r2.text
                r3 = await c.request("GET", key_path(key),
                                     json={"causal-metadata": r2.json()["causal-metadata"]})
                assert r3.json().get("value") == "second", (node, r3.text)
                r4 = await c.request("DELETE", key_path("x"), headers={"x-kv-write-id":
                                                                       "same-id"})
                assert r4.status_code in (200, 404), r4.text
        # ids guessed in advance (as a forwarding node would mint them) suppress nothing
        origin = cluster.nodes[1].replica.origin
        async with cluster.client(3) as c:
            for n in range(1, 20):
                await c.put(key_path("bait"), json={"value": f"bait{n}"},
                            headers={"x-kv-write-id": f"{origin}.{n}"})
        meta: Any = None
        async with cluster.client(1) as c:
            for n in range(10):
                key = f"victim{n}"
                r = await c.put(key_path(key), json={"value": "real", "causal-metadata": meta})
                assert r.status_code == 200, r.text
                meta = r.json()["causal-metadata"]
        for i in NODES:
            async with cluster.client(i) as c:
                for n in range(10):
                    r = await c.request("GET", key_path(f"victim{n}"),
                                        json={"causal-metadata": meta})
                    assert r.json().get("value") == "real", (i, n, r.text)
        assert_healthy(cluster)

    run_in_cluster(False, body)


def test_node_only_headers_count_only_with_the_secret() -> None:
    """With a secret set, an outsider's X-KV-Hops (well formed, at the limit) is ignored: the
    request is forwarded as a client's would be.  With the secret it counts."""

    async def body(cluster: Cluster) -> None:
        view = cluster.nodes[1].replica.view
        assert view is not None
        key = next(f"h{i}" for i in range(1000) if view.shard_for(f"h{i}") == "B")
        hops = {"x-kv-hops": str(MAX_HOPS)}
        async with cluster.client(1) as c:  # node 1 is in A: it must forward
            r = await c.put(key_path(key), json={"value": "v"}, headers=hops)
            assert r.status_code == 200, r.text
        async with cluster.client(1, secret=True) as c:
            r = await c.put(key_path(key), json={"value": "w"}, headers=hops)
            assert r.status_code == 503 and r.json()["error"], r.text

    run_in_cluster(True, body)


def test_a_sync_overclaiming_our_stream_does_not_stall_replication() -> None:
    """Issue 9 item 2 (bare node): a sync forged as node 2 claiming to have seen far more of
    node 1's stream than node 1 ever sent must not stop node 1 replicating to node 2."""

    async def body(cluster: Cluster) -> None:
        n1 = cluster.nodes[1]
        view = n1.replica.view
        assert view is not None
        forged = {"sender": 2, "origin": cluster.nodes[2].replica.origin,
                  "view_id": view.view_id, "epoch": n1.replica.epoch, "after": 0, "upto": 0,
                  "entries": [], "seen": {n1.replica.origin: 10**9}, "positions": []}
        async with cluster.client(1) as c:
            r = await c.post("/internal/sync", json=forged)
            assert r.status_code < 500 and r.json(), r.text
            key = next(f"s{i}" for i in range(1000) if view.shard_for(f"s{i}") == "A")
            r = await c.put(key_path(key), json={"value": "after-forgery"})
            assert r.status_code == 200
        with trio.fail_after(5):  # well within a heartbeat: pushed at once
            while True:
                async with cluster.client(2) as c2:
                    if (await c2.get("/data")).json()["items"].get(key) == "after-forgery":
                        break
                await trio.sleep(0.1)
        assert_healthy(cluster)

    run_in_cluster(False, body)


def test_a_write_version_is_above_its_dependencies_whatever_the_clock() -> None:
    """A dependency up to max_clock_skew ahead (a peer with a fast clock) is accepted, and the
    write it precedes gets a higher version even though the local clock is behind."""

    async def body(cluster: Cluster) -> None:
        ahead = ((time.time_ns() // 1_000_000) + 30_000) << 16
        view = cluster.nodes[1].replica.view
        assert view is not None
        key, other = [k for k in (f"v{i}" for i in range(1000)) if view.shard_for(k) == "A"][:2]
        async with cluster.client(1) as c:
            token = {"deps": {other: [ahead, 2]}}
            r = await c.put(key_path(key), json={"value": "v", "causal-metadata": token})
            assert r.status_code == 200, r.text
            out = r.json()["causal-metadata"]
        entry = cluster.nodes[1].replica.store.get(key)
        assert entry is not None and tuple(entry.version) > (ahead, 2), (entry, out)
        assert_healthy(cluster)

    run_in_cluster(False, body)


def test_a_background_task_failure_is_counted_logged_and_the_task_restarts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 9 item 7: a replication sender that raises (here: its batch maker, once) is
    restarted; the failure is counted and logged, the node keeps serving, and the write it
    was about to push still reaches the other replica."""

    async def body(cluster: Cluster) -> None:
        node = cluster.nodes[1]
        original = node.replica.batch_for
        failed: list[bool] = []

        def fails_once(*args: Any, **kwargs: Any) -> Any:
            if not failed:
                failed.append(True)
                raise RuntimeError("injected sender failure")
            return original(*args, **kwargs)

        node.replica.batch_for = fails_once  # type: ignore[method-assign]
        view = node.replica.view
        assert view is not None
        key = next(f"b{i}" for i in range(1000) if view.shard_for(f"b{i}") == "A")
        async with cluster.client(1) as c:
            r = await c.put(key_path(key), json={"value": "pushed"})
            assert r.status_code == 200, r.text
            meta = r.json()["causal-metadata"]
        with trio.fail_after(20):
            while not failed:
                await trio.sleep(0.05)
        async with cluster.client(2) as c2:  # waits (bounded) until the restarted sender pushed
            r = await c2.request("GET", key_path(key), json={"causal-metadata": meta})
            assert r.status_code == 200 and r.json()["value"] == "pushed", r.text
        assert node.task_failures >= 1  # type: ignore[attr-defined]
        assert "injected sender failure" in caplog.text
        for other in (2, 3, 4):
            failures = getattr(cluster.nodes[other], "task_failures", None)
            assert failures == 0, (other, failures)

    with caplog.at_level("WARNING"):
        run_in_cluster(False, body)


def test_oversized_headers_get_a_json_431_and_change_nothing() -> None:
    async def body(cluster: Cluster) -> None:
        before = await settled_snapshot(cluster)
        big = "f" * (Config().max_header_bytes + 1)
        for node in NODES:
            for probe in (
                Probe("big header", "PUT", key_path("x"), body=encode({"value": "no"}),
                      headers={"x-filler": big}, node=node, expect=frozenset({431})),
                Probe("big token header", "GET", key_path("x"), node=node,
                      headers={"x-causal-metadata": encode({"deps": {big: [1, 1]}}).decode()},
                      expect=frozenset({431})),
            ):
                await check_probe(cluster, probe, before)
        await still_works(cluster, "after431")

    run_in_cluster(False, body)
