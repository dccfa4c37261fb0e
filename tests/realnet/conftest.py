"""Fixtures for the real-network tier: real node processes, real sockets, real iptables.

Tests marked ``realnet`` need root, ``ip``, ``iptables`` and the kernel's network namespaces;
tests marked ``podman`` need root and podman (and debootstrap, or a registry, for the base
image).  Where these are missing the tests are skipped with the reason, never failed.

Every cluster is created with the prefix ``tkvt`` on 10.77.7.0/24 (podman: 10.78.7.0/24), so
a developer's own ``python -m chaos`` cluster (prefix ``tkv``) is left alone, and is torn down
when its test ends, pass or fail.  Two test runs on one machine would share those names, so a
cluster is made only under an exclusive lock (``LOCK``): a second run waits its turn instead of
tearing down the first one's namespaces.  On failure the end of every node's log is printed.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # chaos/ is not an installed package; make it importable
    sys.path.insert(0, str(REPO))

from chaos.cluster import Cluster  # noqa: E402

from .helpers import ClusterFactory  # noqa: E402

PREFIX = "tkvt"
NETNS_SUBNET = "10.77.7.0/24"
PODMAN_SUBNET = "10.78.7.0/24"
LOCK = Path("/run/lock/trio-kv-realnet-tests.lock")

NODE_ENV: dict[str, str] = {
    # Short server-side deadlines keep every request loop of a scenario bounded well inside
    # the test's own time limits (the defaults, 30 s, suit production, not a 12-minute tier).
    "KV_WAIT_DEADLINE": "20",
    "KV_LOG_LEVEL": "warning",
}


@functools.cache
def realnet_unavailable() -> str | None:
    """Why the netns tier cannot run here, or None if it can."""
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridges, iptables); CI runs as root"
    for tool in ("ip", "iptables", "iptables-restore", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not installed (apt-get install iproute2 iptables)"
    probe = "tkvprobe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        ipt = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-S"],
                             capture_output=True, text=True)
        if ipt.returncode != 0:
            return f"iptables does not work in a namespace: {ipt.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@functools.cache
def podman_unavailable() -> str | None:
    """Why the podman tier cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (rootful podman networks and NET_ADMIN); CI runs as root"
    if shutil.which("podman") is None:
        return "podman not installed (apt-get install podman runc)"
    from chaos.image import BASE_IMAGE, image_exists
    if shutil.which("debootstrap") is None and not image_exists(BASE_IMAGE):
        return "neither debootstrap nor a cached base image (apt-get install debootstrap)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, with the reason, what this machine cannot run."""
    for item in items:
        if item.get_closest_marker("realnet") is not None:
            reason = realnet_unavailable()
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"realnet: {reason}"))
        if item.get_closest_marker("podman") is not None:
            reason = podman_unavailable()
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"podman: {reason}"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember each phase's outcome on the item, so fixtures know a test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _dump_logs(cluster: Cluster) -> None:
    for node in cluster.nodes:
        print(f"\n===== node {node.id} log (end) =====\n{cluster.backend.log_tail(node)}")


@pytest.fixture(scope="session")
def _machine_lock() -> Iterator[None]:
    """Held from the first cluster to the end of the run: one run at a time owns the names."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # waits for another run on this machine to finish
        yield


def _factory(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             backend: str, subnet: str, **defaults: Any) -> Iterator[ClusterFactory]:
    request.getfixturevalue("_machine_lock")
    clusters: list[Cluster] = []
    state_dir = tmp_path_factory.mktemp(f"chaos-{backend}")

    def make(n: int, shards: int = 1, env: Mapping[str, str] | None = None,
             **options: Any) -> Cluster:
        merged = {**NODE_ENV, **(env or {})}
        cluster = Cluster.up(n, shards, backend=backend, prefix=PREFIX, state_dir=state_dir,
                             env=merged, subnet=subnet, **{**defaults, **options})
        clusters.append(cluster)
        return cluster

    try:
        yield make
    finally:
        failed = any(getattr(getattr(request.node, f"rep_{p}", None), "failed", False)
                     for p in ("setup", "call"))
        for cluster in clusters:
            if failed:
                _dump_logs(cluster)
            cluster.down()


@pytest.fixture
def netns_cluster(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterFactory]:
    """``netns_cluster(n, shards)`` starts a namespaced cluster, removed after the test."""
    yield from _factory(request, tmp_path_factory, "netns", NETNS_SUBNET)


@pytest.fixture
def podman_cluster(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterFactory]:
    """``podman_cluster(n, shards)``: containers from the Containerfile image."""
    yield from _factory(request, tmp_path_factory, "podman", PODMAN_SUBNET)
