"""/metrics, /openapi.json, request ids, GET /data pages and --help, in-process."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trio_kv.config import Config, build_parser
from trio_kv.config_help import HELP
from trio_kv.testing import open_cluster

from .helpers import get, keys_of, put


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_parse_and_count_what_happened(autojump_clock):
    async with open_cluster({"A": 2, "B": 1}) as cluster, cluster.client(1) as c:
        (b_key,) = keys_of(cluster, "B")
        meta = await put(c, "a-key" if cluster.nodes[1].replica.owns("a-key") else b_key, "v")
        meta = await put(c, b_key, "w", meta)  # forwarded to node 3
        assert (await get(c, "missing", meta)).status_code in (404, 200)
        r = await c.request("DELETE", f"/data/{b_key}", json={"causal-metadata": meta})
        assert r.status_code == 200
        r = await c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = samples(r.text)
        key_route = (("method", "PUT"), ("route", "/data/{key}"), ("status", "200"))
        assert m[("trio_kv_http_requests_total", key_route)] == 2
        assert m[("trio_kv_http_request_duration_seconds_count",
                  (("method", "PUT"), ("route", "/data/{key}")))] == 2
        assert m[("trio_kv_forwarded_requests_total", ())] >= 2
        assert m[("trio_kv_view_changes_total", ())] == 1
        assert ("trio_kv_causal_wait_seconds_bucket", (("le", "+Inf"),)) in m
        assert m[("trio_kv_view_change_state", (("state", "idle"),))] == 1
        # every name follows Prometheus conventions
        for (name, _labels) in m:
            assert name.startswith("trio_kv_")
        async with cluster.client(3) as c3:
            m3 = samples((await c3.get("/metrics")).text)
        assert m3[("trio_kv_tombstones", ())] == 1
        assert m3[("trio_kv_keys", ())] == 0
        async with cluster.client(2) as c2:
            m2 = samples((await c2.get("/metrics")).text)
        assert m2[("trio_kv_replication_messages_total", (("direction", "received"),))] >= 1


async def test_causal_waits_are_counted(autojump_clock):
    async with open_cluster({"A": 2}) as cluster:
        one, two = cluster.address_of(1, 2)
        cluster.network.cut(one, two)
        async with cluster.client(1) as c:
            meta = await put(c, "k", "v")
        async with cluster.client(2) as c:
            r = await c.request("GET", "/data/k", json={"causal-metadata": meta},
                                headers={"x-kv-budget": "0.5"})
            assert r.status_code == 503
            m = samples((await c.get("/metrics")).text)
        assert m[("trio_kv_causal_waits_total", ())] == 1
        assert m[("trio_kv_causal_wait_timeouts_total", ())] == 1
        assert m[("trio_kv_causal_wait_seconds_bucket", (("le", "1.0"),))] == 1


async def test_request_id_follows_a_forwarded_request(autojump_clock, caplog):
    config = dataclasses.replace(Config(), access_log=True)
    async with open_cluster({"A": 1, "B": 1}, config=config) as cluster:
        (b_key,) = keys_of(cluster, "B")
        caplog.set_level(logging.INFO, logger="trio_kv.access")
        async with cluster.client(1) as c:
            r = await c.put(f"/data/{b_key}", json={"value": "v"},
                            headers={"x-request-id": "abc-123"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
            lines = [rec for rec in caplog.records if getattr(rec, "request_id", "") == "abc-123"]
            assert len(lines) == 2  # the forwarding node's line and the owner's
            minted = (await c.get("/ping")).headers["x-request-id"]
            assert minted and minted != "abc-123"
            for bad in (b"x" * 129, b"has space", "é".encode()):
                r = await c.put(f"/data/{b_key}", json={"value": "bad"},
                                headers=[(b"x-request-id", bad)])
                assert r.status_code == 400 and "X-Request-Id" in r.json()["error"]
            assert (await get(c, b_key)).json()["value"] == "v"  # rejected: nothing changed


async def test_pages_of_a_shard(autojump_clock):
    async with open_cluster({"A": 1}) as cluster, cluster.client(1) as c:
        meta: dict = {}
        for i in range(7):
            meta = await put(c, f"k{i}", str(i), meta)
        r = await c.request("DELETE", "/data/k3", json={"causal-metadata": meta})
        whole = (await c.get("/data")).json()
        assert set(whole) == {"items", "causal-metadata"}  # unchanged without parameters
        seen: list[str] = []
        after = ""
        while True:
            r = await c.get("/data", params={"limit": 2, "after": after})
            body = r.json()
            seen += list(body["items"])
            if body["next"] is None:
                break
            assert body["next"] == list(body["items"])[-1]
            after = body["next"]
        assert seen == ["k0", "k1", "k2", "k4", "k5", "k6"]
        r = await c.get("/data", params={"after": "k4"})
        assert list(r.json()["items"]) == ["k5", "k6"] and r.json()["next"] is None
        for query in ("limit=0", "limit=1001", "limit=-1", "limit=x", "limit=1.5",
                      "after=" + "a" * 1025, "limt=3", "limit=٣"):
            r = await c.get("/data?" + query)
            assert r.status_code == 400 and r.json()["error"], query


async def test_openapi_document(autojump_clock):
    async with open_cluster({"A": 1}) as cluster, cluster.client(1) as c:
        spec = (await c.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) >= {"/data/{key}", "/data", "/view", "/ping", "/metrics"}
    assert not any(p.startswith("/internal") for p in spec["paths"])


def test_every_setting_has_a_sentence_with_its_unit() -> None:
    text = build_parser().format_help()
    for f in dataclasses.fields(Config):
        assert f.name in HELP, f"describe {f.name} in trio_kv/config_help.py"
        assert f"KV_{f.name.upper()}" in text
    assert "in seconds" in HELP["wait_deadline"] and "bytes" in HELP["max_value_bytes"]


@pytest.mark.parametrize("raw,expected", [("true", True), ("0", False), ("yes", True)])
def test_boolean_settings(raw: str, expected: bool) -> None:
    from trio_kv.config import load_config

    assert load_config(["--id", "1", "--access-log", raw], {}).access_log is expected


def test_log_lines_name_node_and_request() -> None:
    import io
    import json

    from trio_kv.logs import configure
    from trio_kv.observe import REQUEST_ID

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        for fmt in ("json", "text", "auto"):  # auto on a non-terminal is JSON
            out = io.StringIO()
            configure(dataclasses.replace(Config(), node_id=4, log_format=fmt), out)
            token = REQUEST_ID.set("req-9")
            try:
                logging.getLogger("trio_kv.test").warning("hello %s", "there", extra={"k": 1})
            finally:
                REQUEST_ID.reset(token)
            line = out.getvalue().strip()
            if fmt == "text":
                assert "node4 trio_kv.test WARNING hello there [req req-9]" in line
            else:
                record = json.loads(line)
                assert record["msg"] == "hello there" and record["node"] == 4
                assert record["request_id"] == "req-9" and record["k"] == 1
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
