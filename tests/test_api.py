"""The HTTP contract's edges (API.md): validation, status codes, JSON errors."""

from __future__ import annotations

import dataclasses
from urllib.parse import quote

import pytest
import trio

from trio_kv.config import Config, load_config
from trio_kv.testing import open_cluster

from .helpers import get, put

BAD_PUT_BODIES = [
    (b"", "needs a JSON body"),
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"just a string"', "must be a JSON object"),
    (b"{}", "'value' is missing"),
    (b'{"value": 5}', "not a string"),
    (b'{"value": null}', "not a string"),
    (b'{"value": "v", "causal-metadata": [1]}', "must be a JSON object"),
    (b'{"value": "v", "causal-metadata": {"deps": {"k": "x"}}}', "[timestamp, node]"),
    (b'{"value": "v", "causal-metadata": {"vc": {}}}', "unknown fields"),
]


@pytest.mark.parametrize(("body", "message"), BAD_PUT_BODIES)
async def test_bad_put_bodies_get_400_and_change_nothing(autojump_clock, body, message):
    async with open_cluster({"S": 1}) as cluster, cluster.client(1) as c:
        await put(c, "k", "original")
        r = await c.put("/data/k", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert r.headers["content-type"].startswith("application/json")
        assert message in r.json()["error"]
        assert (await get(c, "k")).json()["value"] == "original"


async def test_limits_on_keys_and_values(autojump_clock):
    config = dataclasses.replace(Config(), max_value_bytes=1000)
    async with open_cluster({"S": 1}, config=config) as cluster, cluster.client(1) as c:
        r = await c.put("/data/" + "k" * 1025, json={"value": "v"})
        assert r.status_code == 400 and "longer than 1024" in r.json()["error"]
        assert (await c.put("/data/" + "k" * 1024, json={"value": "v"})).status_code == 200
        r = await c.put("/data/big", json={"value": "x" * 1001})
        assert r.status_code == 413 and "larger than 1000" in r.json()["error"]
        assert (await get(c, "big")).status_code == 404
        assert (await c.put("/data/ok", json={"value": "é" * 500})).status_code == 200


async def test_keys_are_percent_decoded_path_segments(autojump_clock):
    async with open_cluster({"S": 1}) as cluster, cluster.client(1) as c:
        await put(c, "a%2Fb%20c", "slash")
        r = await c.get("/data")
        assert r.json()["items"] == {"a/b c": "slash"}
        assert (await c.get("/data/a/b")).status_code == 400


async def test_get_with_bad_body_or_metadata_is_400(autojump_clock):
    async with open_cluster({"S": 1}) as cluster, cluster.client(1) as c:
        r = await c.request("GET", "/data/k", content=b"{nope")
        assert r.status_code == 400
        r = await c.request("GET", "/data", json={"causal-metadata": "abc"})
        assert r.status_code == 400
        r = await c.get("/data/k", headers={"X-Causal-Metadata": "{bad"})
        assert r.status_code == 400
        # absent, null and {} all mean no dependencies
        for meta in (None, {}):
            r = await c.request("GET", "/data/k", json={"causal-metadata": meta})
            assert r.status_code == 404
        assert (await c.get("/data/k", headers={"X-Causal-Metadata": "null"})).status_code == 404


async def test_before_a_view_data_is_503_and_ping_works(autojump_clock):
    async with open_cluster({"S": 2}, send_view=False) as cluster, cluster.client(1) as c:
        assert (await c.get("/ping")).json()["ok"] is True
        for method in ("GET", "PUT", "DELETE"):
            r = await c.request(method, "/data/k", json={"value": "v"})
            assert r.status_code == 503 and "no view" in r.json()["error"]
        assert (await c.get("/data")).status_code == 503
        assert (await c.get("/view")).json()["view"] is None


BAD_VIEWS = [
    b"", b"nope", b"[]", b'{"view": 3}', b'{"view": {}}', b'{"view": {"A": []}}',
    b'{"view": {"A": [{"address": "10.0.0.1:8081"}]}}',
    b'{"view": {"A": [{"address": "10.0.0.1:8081", "id": 1}, '
    b'{"address": "10.0.0.2:8081", "id": 1}]}}',
    b'{"view": {"A": [{"address": "10.0.0.1:8081", "id": 1}], '
    b'"B": [{"address": "10.0.0.1:8081", "id": 2}]}}',
    b'{"view": {"A": "10.0.0.1:8081"}}',
]


@pytest.mark.parametrize("body", BAD_VIEWS)
async def test_bad_views_are_400_and_change_nothing(autojump_clock, body):
    async with open_cluster({"S": 2}) as cluster, cluster.client(1) as c:
        before = (await c.get("/view")).json()
        r = await c.put("/view", content=body)
        assert r.status_code == 400 and r.json()["error"]
        assert (await c.get("/view")).json() == before


async def test_view_is_idempotent_legacy_form_accepted_and_reported(autojump_clock):
    async with open_cluster({"S": 2}) as cluster, cluster.client(1) as c:
        body = cluster.view_body()
        body["causal-metadata"] = {"deps": {}}  # unknown extra fields are ignored
        first = (await c.get("/view")).json()
        r = await c.put("/view", json=body)
        assert r.status_code == 200
        again = (await c.get("/view")).json()
        assert again["epoch"] == first["epoch"] and again["view_id"] == first["view_id"]
        assert again["id"] == 1 and again["shard"] == "S"
        legacy = {"view": [{"address": cluster.addresses[i], "id": str(i)} for i in (1, 2)]}
        for i in (1, 2):
            async with cluster.client(i) as ci:
                assert (await ci.put("/view", json=legacy)).status_code == 200
        status = (await c.get("/view")).json()
        assert status["shard"] == "shard1" and status["epoch"] > first["epoch"]
        # replicas of one view converge on one epoch for it
        async with cluster.client(2) as c2:
            with trio.fail_after(30):
                while (await c2.get("/view")).json()["epoch"] != (await c.get("/view")).json()[
                    "epoch"
                ]:
                    await trio.sleep(0.5)


async def test_unknown_routes_and_methods_are_json(autojump_clock):
    async with open_cluster({"S": 1}) as cluster, cluster.client(1) as c:
        r = await c.get("/nope")
        assert r.status_code == 404 and r.json()["error"]
        r = await c.post("/data/k", json={"value": "v"})
        assert r.status_code == 405 and r.json()["error"]


async def test_internal_endpoints_require_the_cluster_secret(autojump_clock):
    config = dataclasses.replace(Config(), cluster_secret="s3cret")
    async with open_cluster({"S": 2}, config=config) as cluster, cluster.client(1) as c:
        handoff = {"entries": [], "from": 2, "epoch": 0, "view_id": ""}
        r = await c.post("/internal/handoff", json=handoff)
        assert r.status_code == 401 and "secret" in r.json()["error"]
        r = await c.post("/internal/handoff", json=handoff, headers={"x-kv-secret": "s3cret"})
        assert r.status_code == 200
        meta = await put(c, "k", "v")  # replication itself carries the secret
        async with cluster.client(2) as c2:
            assert (await get(c2, "k", meta)).json()["value"] == "v"


async def test_node_removed_from_the_view_hands_off_then_routes(autojump_clock):
    async with open_cluster({"S": 3}) as cluster, cluster.client(3) as c:
        meta = await put(c, "k", "v")
        await cluster.put_view({"S": [1, 2]}, to=[1, 2, 3])
        assert cluster.nodes[3].replica.shard is None
        r = await get(c, "k", meta)  # node 3 holds nothing now and asks the owners
        assert r.status_code == 200 and r.json()["value"] == "v"
        meta = await put(c, "k", "w", r.json()["causal-metadata"])
        assert "k" not in cluster.nodes[3].replica.store.entries
        async with cluster.client(1) as c1:
            assert (await get(c1, "k", meta)).json()["value"] == "w"


def test_config_from_env_and_cli():
    cfg = load_config(["--port", "9000", "--wait-deadline", "2.5"],
                      {"NODE_IDENTIFIER": "7", "KV_MAX_VALUE_BYTES": "10", "HOST": "::1"})
    assert (cfg.node_id, cfg.port, cfg.host, cfg.wait_deadline, cfg.max_value_bytes) == (
        7, 9000, "::1", 2.5, 10)
    assert load_config(["--id", "3"], {}).node_id == 3


async def test_waiting_requests_are_capped(autojump_clock):
    import trio

    config = dataclasses.replace(Config(), max_waiting=3)
    async with open_cluster({"S": 2}, config=config) as cluster:
        cluster.network.cut(*cluster.address_of(1, 2))
        async with cluster.client(1) as on_1, cluster.client(2) as on_2:
            meta = await put(on_1, "x", "1")
            statuses: list[int] = []

            async def read() -> None:
                statuses.append((await get(on_2, "x", meta)).status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(read)
                await trio.sleep(1)
                r = await get(on_2, "x", meta)  # the fourth is turned away at once
                assert r.status_code == 503 and "max_waiting=3" in r.json()["error"]
                cluster.network.heal()
            assert statuses == [200, 200, 200]
            assert cluster.nodes[2].core.waiting() == 0


async def test_keys_with_control_characters_are_keys(autojump_clock):
    async with open_cluster({"A": 1, "B": 1}) as cluster, cluster.client(1) as c:
        for key in ("line\nbreak", "cr\r", "tab\tkey"):
            path = "/data/" + quote(key, safe="")
            r = await c.put(path, json={"value": "v"})
            assert r.status_code == 200, (key, r.text)
            r = await c.get(path)
            assert r.status_code == 200 and r.json()["value"] == "v"
