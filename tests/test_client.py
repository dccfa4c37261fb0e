"""``trio_kv.client.AsyncClient`` against in-process clusters (the sync ``Client`` and asyncio
are exercised against real processes in test_cli.py)."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from trio_kv.client import (
    AsyncClient,
    BadRequest,
    KeyNotFound,
    OutcomeUnknown,
    TooLarge,
    Unavailable,
)
from trio_kv.client_core import Core, parse_nodes
from trio_kv.config import Config
from trio_kv.testing import CLIENT, Cluster, open_cluster

from .helpers import converged, keys_of


def client(cluster: Cluster, *ids: int, **options: object) -> AsyncClient:
    return AsyncClient(cluster.address_of(*ids), transport=cluster.network.transport(CLIENT),
                       **options)  # type: ignore[arg-type]


async def test_session_reads_are_causal_across_nodes_through_failover(autojump_clock):
    async with open_cluster({"A": 3}) as cluster:
        one, two, three = cluster.address_of(1, 2, 3)
        async with client(cluster, 1, 2) as kv:
            await kv.put("x", "old")
            assert await converged(cluster, [1, 2, 3]) == {"x": "old"}
            cluster.network.partition([one], [two, three])  # replication from 1 stops
            await kv.put("x", "new")
            assert kv.session["deps"]["x"]  # the client holds the token, the caller does not
            cluster.network.down.add(one)
            began = trio.current_time()

            async def heal_later() -> None:
                await trio.sleep(2)
                cluster.network.down.discard(one)
                cluster.network.heal()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(heal_later)
                # node 1 refuses: the client moves to node 2, which waits for x=new
                assert await kv.get("x") == "new"
            assert trio.current_time() - began >= 2
            assert kv.nodes[kv._core.current] == two


async def test_a_session_handed_to_another_client_keeps_its_causal_past(autojump_clock):
    async with open_cluster({"A": 2, "B": 2}) as cluster:
        (b_key,) = keys_of(cluster, "B")
        three, four = cluster.address_of(3, 4)
        cluster.network.cut(three, four)  # B's replicas do not replicate to each other
        async with client(cluster, 1) as writer:
            await writer.put(b_key, "v1")  # forwarded by node 1 to node 3 or 4
            session = writer.session
        owner = 3 if b_key in cluster.nodes[3].replica.store.entries else 4
        other = 7 - owner
        async with client(cluster, other, session=session, retries=0) as reader:
            with trio.move_on_after(3):  # it waits rather than answer 404 or stale
                await reader.get(b_key)
                pytest.fail("read answered without the session's write")
            cluster.network.heal()
            assert await reader.get(b_key) == "v1"
            await reader.put(b_key, "v2")
        async with client(cluster, owner, session=reader.session) as third:
            assert await third.get(b_key) == "v2"
            assert await third.items() == {b_key: "v2"}


async def test_typed_errors(autojump_clock):
    config = dataclasses.replace(Config(), max_value_bytes=10, max_key_bytes=8)
    async with open_cluster({"A": 1}, config=config) as cluster:
        async with client(cluster, 1) as kv:
            with pytest.raises(KeyNotFound) as missing:
                await kv.get("nope")
            assert missing.value.key == "nope" and missing.value.status == 404
            with pytest.raises(KeyNotFound):
                await kv.delete("nope")
            with pytest.raises(BadRequest) as bad:
                await kv.get("k" * 9)
            assert bad.value.status == 400 and "longer" in bad.value.message
            with pytest.raises(TooLarge):
                await kv.put("k", "v" * 11)
            await kv.put("k", "v")
            await kv.delete("k")
            with pytest.raises(KeyNotFound):
                await kv.get("k")
        cluster.network.down.add(cluster.addresses[1])
        async with client(cluster, 1, retries=2) as kv:
            with pytest.raises(Unavailable):
                await kv.get("k")
        cluster.network.down.discard(cluster.addresses[1])
        cluster.network.delays[cluster.addresses[1]] = 1.0
        async with client(cluster, 1) as kv, trio.open_nursery() as nursery:
            async def crash() -> None:
                await trio.sleep(1.5)  # the write arrived; the node dies before answering
                cluster.network.down.add(cluster.addresses[1])
            nursery.start_soon(crash)
            with pytest.raises(OutcomeUnknown):
                await kv.put("k", "w")


async def test_a_503_moves_the_client_to_another_node(autojump_clock):
    async with open_cluster({"A": 1}, spare=1) as cluster:
        async with client(cluster, 2, 1) as kv:  # node 2 has no view: it answers 503
            await kv.put("k", "v")
            assert await kv.get("k") == "v"
            assert kv.nodes[kv._core.current] == cluster.addresses[1]
        async with client(cluster, 2, retries=1) as kv:
            with pytest.raises(Unavailable) as exc:
                await kv.get("k")
            assert exc.value.status == 503 and "no view" in exc.value.message


async def test_items_pages_through_every_shard(autojump_clock):
    async with open_cluster({"A": 2, "B": 1}) as cluster, client(cluster, 3) as kv:
        expected = {f"key{i}": str(i) for i in range(25)}
        for k, v in expected.items():
            await kv.put(k, v)
        assert await kv.items(page_size=4) == expected
        items, nxt = await kv.page(limit=3, node=cluster.addresses[3])
        assert len(items) == 3 and nxt == max(items)


def test_concurrent_answers_keep_each_others_writes() -> None:
    core = Core(["a:1"], {"deps": {"x": [5, 1]}}, 0, 0.1, 1.0, None)
    sent = core.session
    core.absorb(sent, {"causal-metadata": {"deps": {"x": [5, 1], "y": [7, 1]}}})  # call 1
    core.absorb(sent, {"causal-metadata": {"deps": {"z": [9, 2]}}})  # call 2 pruned x
    assert core.session == {"deps": {"y": [7, 1], "z": [9, 2]}}


def test_node_addresses_are_validated() -> None:
    assert parse_nodes("a:1, http://b:2/") == ["a:1", "b:2"]
    for bad in ("", "a", "a:0", "a:99999", "a:1/x", "a b:1"):
        with pytest.raises(ValueError):
            parse_nodes(bad)


async def test_items_through_a_routing_node_alone(autojump_clock):
    async with open_cluster({"A": 1, "B": 1}, spare=1) as cluster:
        await cluster.put_view(to=[1, 2, 3])
        async with client(cluster, 3) as kv:  # node 3 routes; the client knows only it
            expected = {f"r{i}": str(i) for i in range(9)}
            for k, v in expected.items():
                await kv.put(k, v)
            cluster.network.cut("client", cluster.addresses[1])  # members unreachable
            cluster.network.cut("client", cluster.addresses[2])
            assert await kv.items(page_size=2) == expected
