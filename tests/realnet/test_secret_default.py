"""Secret by default: clusters the chaos tool (and so devenv.py) starts share a random cluster
secret; views it sends carry it; an outsider's view or peer message is refused.  Local backend:
no root needed."""

from __future__ import annotations

from pathlib import Path

import httpx

from chaos.cli import build_parser, up_env
from chaos.client import KVClient
from chaos.cluster import SECRET_ENV, SECRET_HEADER, Cluster, with_secret

from .test_local_backend import free_base_port


def test_a_chaos_cluster_has_a_random_secret_and_refuses_outsiders(tmp_path: Path) -> None:
    cluster = Cluster.up(2, 1, backend="local", prefix="tkvs", state_dir=tmp_path,
                         base_port=free_base_port(2), env={"KV_LOG_LEVEL": "warning"})
    try:
        secret = cluster.state.secret
        assert len(secret) >= 32
        assert (tmp_path / "tkvs" / "state.json").stat().st_mode & 0o077 == 0
        url = cluster.url(1)
        with KVClient("c") as client:  # clients need no secret
            assert client.put(url, "k", "v").status == 200
            assert client.get(cluster.url(2), "k").value == "v"
        body = {"view": cluster.state.view()}
        assert httpx.put(f"{url}/view", json=body, timeout=10).status_code == 401
        r = httpx.put(f"{url}/view", json=body, headers={SECRET_HEADER: secret}, timeout=30)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/internal/handoff", timeout=10,
                       json={"entries": [["evil", "x", 1 << 16, 2, None]], "from": 2})
        assert r.status_code == 401 and r.json()["error"]
        assert httpx.get(f"{url}/data/evil", timeout=10).status_code == 404
        cluster.restart(2)  # restart resends the view, with the secret
        cluster.wait_converged(timeout=10)
        attached = Cluster.attach("tkvs", tmp_path)  # another CLI invocation: same secret
        assert attached.state.secret == secret
        assert "cluster secret" in cluster.describe()
    finally:
        cluster.down()


def test_secret_choices() -> None:
    assert with_secret(None)[SECRET_ENV] != with_secret(None)[SECRET_ENV]
    assert with_secret({SECRET_ENV: "mine"})[SECRET_ENV] == "mine"
    assert with_secret({SECRET_ENV: ""})[SECRET_ENV] == ""  # bare nodes, on request
    args = build_parser().parse_args(["up", "3", "--no-secret"])
    assert up_env(args)[SECRET_ENV] == ""
    assert SECRET_ENV not in up_env(build_parser().parse_args(["up", "3"]))


def test_bare_chaos_cluster_still_works(tmp_path: Path) -> None:
    cluster = Cluster.up(2, 1, backend="local", prefix="tkvb", state_dir=tmp_path,
                         base_port=free_base_port(2), env={SECRET_ENV: ""})
    try:
        assert cluster.state.secret == ""
        body = {"view": cluster.state.view()}
        assert httpx.put(f"{cluster.url(1)}/view", json=body, timeout=30).status_code == 200
        with KVClient("c") as client:
            assert client.put(cluster.url(1), "k", "v").status == 200
            assert client.get(cluster.url(2), "k").value == "v"
    finally:
        cluster.down()
