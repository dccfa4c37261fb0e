"""``GET /metrics``: Prometheus text, built at scrape time from the node's plain counters.

Each node has its own ``CollectorRegistry`` (tests run many nodes in one process), holding one
custom collector that reads ``ObserveMiddleware.stats`` (requests), ``Node.stats`` (causal
waits, replication, forwarding, view changes), the peer clients' call counters and the store.
Nothing is computed on a request's path beyond what ``observe`` counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .observe import RequestStats
from .stats import Histogram

if TYPE_CHECKING:
    from .node import Node

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _histogram(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def _add(family: HistogramMetricFamily, labels: list[str], hist: Histogram) -> None:
    family.add_metric(labels, hist.cumulative(), hist.total)


class NodeCollector(Collector):
    def __init__(self, node: Node, requests: RequestStats) -> None:
        self.node = node
        self.requests = requests

    def collect(self) -> Iterator[Metric]:
        yield from self._requests()
        yield from self._data()
        yield from self._causal()
        yield from self._replication()
        yield from self._forwarding()
        yield from self._views()

    def _requests(self) -> Iterator[Metric]:
        req = self.requests
        total = CounterMetricFamily("trio_kv_http_requests", "HTTP requests answered, by route "
                                    "template, method and status.",
                                    labels=["route", "method", "status"])
        for (route, method, status), n in sorted(req.counts.items()):
            total.add_metric([route, method, str(status)], n)
        yield total
        latency = _histogram("trio_kv_http_request_duration_seconds", "Time from request to "
                             "the end of the response, by route and method.", ["route", "method"])
        for (route, method), hist in sorted(req.latency.items()):
            _add(latency, [route, method], hist)
        yield latency
        yield GaugeMetricFamily("trio_kv_http_requests_in_flight", "Requests being served now.",
                                value=req.in_flight)

    def _data(self) -> Iterator[Metric]:
        entries = self.node.replica.store.entries
        tombstones = sum(1 for e in entries.values() if e.value is None)
        yield GaugeMetricFamily("trio_kv_keys", "Live keys held by this node.",
                                value=len(entries) - tombstones)
        yield GaugeMetricFamily("trio_kv_tombstones", "Deleted keys (tombstones) held by this "
                                "node.", value=tombstones)

    def _causal(self) -> Iterator[Metric]:
        st = self.node.stats
        yield CounterMetricFamily("trio_kv_causal_waits", "Reads that waited for a causal "
                                  "dependency to arrive.", value=st.causal_waits)
        yield CounterMetricFamily("trio_kv_causal_wait_timeouts", "Causal waits that reached "
                                  "the deadline (answered 503).", value=st.causal_wait_timeouts)
        hist = _histogram("trio_kv_causal_wait_seconds", "How long reads waited for causal "
                          "dependencies.", [])
        _add(hist, [], st.causal_wait_seconds)
        yield hist
        yield CounterMetricFamily("trio_kv_waits_refused", "Requests refused with 503 because "
                                  "max_waiting requests were already waiting.",
                                  value=st.waits_refused)
        yield GaugeMetricFamily("trio_kv_requests_waiting", "Requests parked in a causal or "
                                "handoff wait now.", value=self.node.core.waiting())
        crossdeps = self.node.core.crossdeps
        yield CounterMetricFamily("trio_kv_crossdeps_dropped", "Dependencies on other shards' "
                                  "keys dropped from stored values, once their owning shard "
                                  "said they are stable.", value=crossdeps.dropped)
        yield GaugeMetricFamily("trio_kv_crossdeps_queued", "Local keys whose values wait for "
                                "other shards to prove their dependencies stable.",
                                value=len(crossdeps.queue))

    def _replication(self) -> Iterator[Metric]:
        node, st = self.node, self.node.stats
        msgs = CounterMetricFamily("trio_kv_replication_messages", "Replication batches, by "
                                   "direction (sent: acknowledged by a peer).",
                                   labels=["direction"])
        msgs.add_metric(["sent"], st.sync_sent)
        msgs.add_metric(["received"], st.sync_received)
        yield msgs
        entries = CounterMetricFamily("trio_kv_replication_entries", "Entries carried by "
                                      "replication batches, by direction.", labels=["direction"])
        entries.add_metric(["sent"], st.sync_entries_sent)
        entries.add_metric(["received"], st.sync_entries_received)
        yield entries
        peer = node.sync_client.stats
        for name, table, doc in (
            ("trio_kv_peer_calls", peer.calls, "Node-to-node calls made (replication, "
             "handoff, pull, view probes), by route."),
            ("trio_kv_peer_call_failures", peer.failures, "Node-to-node calls that got no "
             "answer, by route."),
            ("trio_kv_peer_sent_bytes", peer.bytes_sent, "Request bytes sent to peers, by "
             "route."),
            ("trio_kv_peer_received_bytes", peer.bytes_received, "Response bytes received from "
             "peers, by route."),
        ):
            family = CounterMetricFamily(name, doc, labels=["route"])
            for route, n in sorted(table.items()):
                family.add_metric([route], n)
            yield family
        lag = GaugeMetricFamily("trio_kv_replication_lag_entries", "Changes in this node's "
                                "stream that a peer of its shard has not confirmed.",
                                labels=["peer"])
        head = node.replica.store.head
        for member in node.replica.peers:
            lag.add_metric([str(member.id)], max(0, head - node.replica.claims.get(member.id, 0)))
        yield lag

    def _forwarding(self) -> Iterator[Metric]:
        fwd = self.node.forward_client.stats
        calls = CounterMetricFamily("trio_kv_forwarded_requests", "Client requests forwarded "
                                    "to another node (attempts).", value=sum(fwd.calls.values()))
        yield calls
        yield CounterMetricFamily("trio_kv_forward_failures", "Forwarding attempts that got no "
                                  "answer (the next replica is tried).",
                                  value=sum(fwd.failures.values()))
        yield CounterMetricFamily("trio_kv_forward_gave_up", "Forwarded requests answered 503 "
                                  "because no replica answered in time.",
                                  value=self.node.stats.forward_gave_up)
        yield CounterMetricFamily("trio_kv_forwarded_bytes", "Bytes of forwarded requests and "
                                  "their answers.", value=sum(fwd.bytes_sent.values())
                                  + sum(fwd.bytes_received.values()))

    def _views(self) -> Iterator[Metric]:
        node = self.node
        p = node.progress
        yield CounterMetricFamily("trio_kv_view_changes", "Views installed since start.",
                                  value=node.stats.view_changes)
        yield GaugeMetricFamily("trio_kv_view_epoch", "Epoch of the view this node serves.",
                                value=node.replica.epoch)
        shipped = CounterMetricFamily("trio_kv_transfer_entries_sent", "Entries sent for view "
                                      "changes since start, each copy counted.", labels=["kind"])
        shipped.add_metric(["pull"], node.stats.pull_entries_served)
        shipped.add_metric(["handoff"], node.stats.handoff_entries_sent)
        yield shipped
        state = GaugeMetricFamily("trio_kv_view_change_state", "1 for the current state of the "
                                  "view change (idle, changing, pending).", labels=["state"])
        for name in ("idle", "changing", "pending"):
            state.add_metric([name], 1.0 if p.state == name else 0.0)
        yield state
        for name, value, doc in (
            ("trio_kv_view_change_keys_sent", p.keys_sent, "Keys handed off in the last change "
             "(sent, or found held already), per receiver."),
            ("trio_kv_view_change_sent_bytes", p.bytes_sent, "Bytes handed off in the last "
             "change."),
            ("trio_kv_view_change_keys_received", p.keys_received, "Keys received by handoff "
             "or pull in the last change."),
            ("trio_kv_view_change_received_bytes", p.bytes_received, "Bytes received in the "
             "last change."),
            ("trio_kv_view_change_keys_remaining", p.keys_remaining, "Keys still to hand off."),
            ("trio_kv_view_change_pulls_pending", len(p.pulls_pending), "Old owners still to "
             "pull from."),
            ("trio_kv_view_change_peers_pending", len(p.peers_pending), "New owners that have "
             "not acknowledged a handoff."),
            ("trio_kv_view_change_duration_seconds", p.seconds, "Length of the last change."),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        failures = getattr(node, "task_failures", None)
        if isinstance(failures, int):
            yield CounterMetricFamily("trio_kv_task_failures", "Background task crashes "
                                      "(each restarted).", value=failures)


def registry_for(node: Node, requests: RequestStats) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node, requests))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
