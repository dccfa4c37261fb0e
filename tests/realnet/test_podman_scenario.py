"""One scenario over podman: the image built from Containerfile, cut with iptables inside.

Builds (or reuses) the registry-free base image and the node image, starts three containers
on a podman network, checks the image's promises (non-root user, HEALTHCHECK on /ping), then
runs the causal chain across a partition, a SIGKILL + restart of a container, and checks
convergence and the recorded history.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos.client import KVClient
from chaos.history import History
from chaos.util import run

from .helpers import ClusterFactory, assert_causal, causal_chain_across_partition

pytestmark = pytest.mark.podman


def test_containers_partition_heal_and_restart(podman_cluster: ClusterFactory,
                                               tmp_path: Path) -> None:
    cluster = podman_cluster(3)
    name = cluster.node(1).name
    assert run(["podman", "exec", name, "id", "-u"]).stdout.strip() != "0", "runs as root"
    assert run(["podman", "healthcheck", "run", name], check=False).returncode == 0
    caps = run(["podman", "inspect", "-f", "{{.EffectiveCaps}}", name]).stdout
    assert "CAP_NET_ADMIN" in caps  # given by the chaos tool, not by the image

    a = cluster.url(1)
    history = History()
    with KVClient("c1", history) as c1, KVClient("c2", history) as c2, \
            KVClient("c3", history) as c3:
        causal_chain_across_partition(cluster, history, (c1, c2, c3), hold=1.5)

        cluster.wait_converged(timeout=10)
        cluster.kill(3)
        assert not cluster.backend.alive(cluster.node(3))
        assert c1.put(a, "z", "z1").status == 200
        cluster.restart(3)
        _, items = cluster.wait_converged(timeout=10)
        assert items["n3"] == {"x": "x1", "y": "y1", "z": "z1"}
        assert c1.get(cluster.url(3), "z").value == "z1"
    assert_causal(history, cluster, dump_to=tmp_path / "history.jsonl")
