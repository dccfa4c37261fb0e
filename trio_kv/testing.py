"""In-process clusters for tests: N nodes in one trio run, joined by a fault-injecting network.

Nodes talk through ``httpx`` over ``FaultyTransport``, which routes by address to each node's
ASGI app and applies the network's faults, as an iptables DROP rule would: a request over a
*cut* link cannot connect (a connect timeout: provably not sent), an answer over a cut return
path never arrives (the caller's cancel scope ends the wait: it may have been applied), a
*down* node refuses connections, and links can be delayed.  Use with trio's autojump clock:
seconds of simulated partition run in milliseconds.

Each node's wall clock can be offset (``clock_offsets``, seconds) to run nodes with skewed
clocks; a cluster whose config has a ``cluster_secret`` sends it with every view it sends.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from .api import build_app
from .config import Config
from .node import Node
from .transport import SECRET_HEADER

CLIENT = "client"
CONNECT_TIMEOUT = 1.0


class Network:
    """Which links are cut, which nodes are down, which links are slow."""

    def __init__(self) -> None:
        self.apps: dict[str, Any] = {}
        self.blocked: set[tuple[str, str]] = set()  # directed (src, dst) links that drop
        self.down: set[str] = set()
        self.delays: dict[str, float] = {}  # address -> added latency each way
        self.latency = 0.0001  # every hop takes a little time, as on a real network

    def cut(self, a: str, b: str, *, both_ways: bool = True) -> None:
        self.blocked.add((a, b))
        if both_ways:
            self.blocked.add((b, a))

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link between members of different groups."""
        sets = [set(g) for g in groups]
        for i, g in enumerate(sets):
            for h in sets[i + 1 :]:
                for a in g:
                    for b in h:
                        self.cut(a, b)

    def isolate(self, address: str) -> None:
        for other in self.apps:
            if other != address:
                self.cut(address, other)

    def heal(self) -> None:
        self.blocked.clear()
        self.delays.clear()

    def transport(self, src: str) -> FaultyTransport:
        return FaultyTransport(self, src)


class FaultyTransport(httpx.AsyncBaseTransport):
    def __init__(self, network: Network, src: str) -> None:
        self.network = network
        self.src = src

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        net = self.network
        dst = f"{request.url.host}:{request.url.port}"
        app = net.apps.get(dst)
        if app is None or dst in net.down:
            raise httpx.ConnectError(f"connection refused by {dst}", request=request)
        if (self.src, dst) in net.blocked:
            # A cut link: the connection cannot be made (SYN dropped), so the caller learns,
            # after its connect timeout, that nothing was sent.
            await trio.sleep(CONNECT_TIMEOUT)
            raise httpx.ConnectTimeout(f"no route to {dst}", request=request)
        await self._hop(self.src, dst)
        response = await httpx.ASGITransport(app=app).handle_async_request(request)
        await self._hop(dst, self.src)  # a cut return path: delivered, but no answer
        if dst in net.down:
            raise httpx.RemoteProtocolError("server went down mid-request", request=request)
        return response

    async def _hop(self, a: str, b: str) -> None:
        net = self.network
        await trio.sleep(net.latency + net.delays.get(a, 0.0) + net.delays.get(b, 0.0))
        if (a, b) in net.blocked:
            await trio.sleep_forever()  # dropped: only the caller's deadline ends this


@dataclasses.dataclass
class Cluster:
    network: Network
    nodes: dict[int, Node]
    addresses: dict[int, str]
    shards: dict[str, list[int]]
    scopes: dict[int, trio.CancelScope] = dataclasses.field(default_factory=dict)
    nursery: trio.Nursery | None = None
    config: Config = dataclasses.field(default_factory=Config)
    clock_offsets: dict[int, float] = dataclasses.field(default_factory=dict)
    data_root: str = ""  # one data directory per node below it ("": memory only)

    def view_body(self, shards: dict[str, list[int]] | None = None) -> dict[str, Any]:
        shards = self.shards if shards is None else shards
        return {
            "view": {
                name: [{"address": self.addresses[i], "id": i} for i in ids]
                for name, ids in shards.items()
            }
        }

    def client(
        self, node_id: int, timeout: float = 60.0, secret: bool = False
    ) -> httpx.AsyncClient:
        """A client of one node, as an outsider's; with ``secret`` it also sends the cluster
        secret (if any), as an operator's would."""
        headers = (
            {SECRET_HEADER: self.config.cluster_secret}
            if secret and self.config.cluster_secret else {}
        )
        return httpx.AsyncClient(
            transport=self.network.transport(CLIENT),
            base_url=f"http://{self.addresses[node_id]}",
            timeout=timeout,
            headers=headers,
        )

    async def put_view(
        self, shards: dict[str, list[int]] | None = None, to: Iterable[int] | None = None
    ) -> None:
        """Send the view to ``to`` (default: every node in it) concurrently; all must say 200."""
        body = self.view_body(shards)
        targets = list(to) if to is not None else [i for ids in body_ids(body) for i in ids]
        statuses: dict[int, int] = {}

        async def send(i: int) -> None:
            async with self.client(i, secret=True) as c:
                statuses[i] = (await c.put("/view", json=body)).status_code

        async with trio.open_nursery() as nursery:
            for i in targets:
                nursery.start_soon(send, i)
        assert all(s == 200 for s in statuses.values()), statuses
        if shards is not None:
            self.shards = shards

    def address_of(self, *node_ids: int) -> list[str]:
        return [self.addresses[i] for i in node_ids]


def body_ids(body: dict[str, Any]) -> list[list[int]]:
    return [[m["id"] for m in members] for members in body["view"].values()]


def add_node(cluster: Cluster, nursery: trio.Nursery, node_id: int, config: Config) -> Node:
    """Start one more node (not yet in any view) inside ``nursery``."""
    address = f"10.0.0.{node_id}:8081"
    if cluster.data_root:
        config = dataclasses.replace(config, data_dir=data_dir(cluster, node_id))
    node = Node(
        dataclasses.replace(config, node_id=node_id),
        transport_factory=_factory(cluster.network, address),
        wall_ms=skewed_wall_ms(cluster.clock_offsets.get(node_id, 0.0)),
    )
    if node.persist.storage is not None:
        # autojump clock: no worker threads (the clock would jump past every timeout while
        # one runs), and no fsync (a "crash" here is a cancelled task, not a power cut)
        node.persist.inline = True
        node.persist.storage.sync = False
    cluster.network.apps[address] = build_app(node)
    cluster.nodes[node_id] = node
    cluster.addresses[node_id] = address
    scope = cluster.scopes[node_id] = trio.CancelScope()

    async def run() -> None:
        with scope:
            await node.run()

    nursery.start_soon(run)
    return node


def data_dir(cluster: Cluster, node_id: int) -> str:
    return f"{cluster.data_root}/node{node_id}"


async def restart_node(
    cluster: Cluster, nursery: trio.Nursery, node_id: int, wipe: bool = False
) -> Node:
    """Crash a node (its memory is lost; what it committed to its data directory, if the
    cluster has them, is not) and start a new incarnation at the same address.  ``wipe``
    also deletes its data directory, as a replaced disk would."""
    cluster.scopes[node_id].cancel()
    old = cluster.nodes[node_id]
    if old.persist.enabled:
        with trio.CancelScope(shield=True):
            await old.persist.stopped.wait()  # its writer has let go of the file
    if wipe and cluster.data_root:
        shutil.rmtree(data_dir(cluster, node_id), ignore_errors=True)
    node = add_node(cluster, nursery, node_id, cluster.config)
    await node.started.wait()
    return node


def skewed_wall_ms(offset: float) -> Callable[[], int]:
    """Wall-clock milliseconds off by ``offset`` seconds (a node whose clock is wrong)."""
    offset_ms = round(offset * 1000)

    def wall_ms() -> int:
        return time.time_ns() // 1_000_000 + offset_ms

    return wall_ms


def _factory(network: Network, src: str) -> Any:
    def make(limits: httpx.Limits) -> httpx.AsyncBaseTransport:
        return network.transport(src)

    return make


@asynccontextmanager
async def open_cluster(
    shards: dict[str, int] | None = None,
    config: Config | None = None,
    send_view: bool = True,
    spare: int = 0,
    clock_offsets: Mapping[int, float] | None = None,
    data_root: str = "",
) -> AsyncIterator[Cluster]:
    """Nodes numbered from 1, shard by shard (``{"A": 2, "B": 2}`` -> A=[1,2], B=[3,4]),
    plus ``spare`` nodes outside the view; the view is sent to all members unless told not to.
    ``clock_offsets`` maps node ids to how far (seconds) their wall clocks are off.  With
    ``data_root`` every node keeps its data in a directory below it (durable restarts)."""
    shards = shards or {"A": 3}
    config = config or Config()
    cluster = Cluster(
        Network(), {}, {}, {}, config=config, clock_offsets=dict(clock_offsets or {}),
        data_root=data_root,
    )
    next_id = 1
    for name, count in shards.items():
        cluster.shards[name] = list(range(next_id, next_id + count))
        next_id += count
    async with trio.open_nursery() as nursery:
        for node_id in range(1, next_id + spare):
            add_node(cluster, nursery, node_id, config)
        for node in cluster.nodes.values():
            await node.started.wait()
        if send_view:
            await cluster.put_view()
        cluster.nursery = nursery
        yield cluster
        nursery.cancel_scope.cancel()
