"""The command-line client and ``trio_kv.client`` against real node processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from trio_kv.client import AsyncClient, Client, KeyNotFound

from .test_processes import Procs, _free_ports


@pytest.fixture(scope="module")
def cluster() -> Iterator[Procs]:
    """Nodes 1-4 in shards A=[1,2], B=[3,4]; node 5 has the view and no shard (a router)."""
    with Procs(_free_ports(5)).running() as p:
        view = {"view": {"A": [p.addr(0), p.addr(1)], "B": [p.addr(2), p.addr(3)]}}
        Path(p.logdir, "view.json").write_text(json.dumps(view))
        assert cli(p, "view", "--set", f"{p.logdir}/view.json").returncode == 0
        with httpx.Client(timeout=20) as c:  # the router gets it too
            assert c.put(p.url(4) + "/view", json=view).status_code == 200
        yield p


def _addr(self: Procs, i: int) -> dict[str, object]:
    return {"address": f"127.0.0.1:{self.ports[i]}", "id": i + 1}


Procs.addr = _addr  # type: ignore[attr-defined]


def node(p: Procs, i: int) -> str:
    return f"127.0.0.1:{p.ports[i]}"


def cli(p: Procs, *args: str, session: str | None = None, nodes: tuple[int, ...] = (0,),
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_KV_")}
    if session:
        env["TRIO_KV_SESSION"] = session
    argv = [sys.executable, "-m", "trio_kv", *args]
    for i in nodes:
        argv += ["--node", node(p, i)]
    return subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True,
                          timeout=60)


def test_successive_commands_are_causally_ordered_through_the_session_file(cluster, tmp_path):
    session = str(tmp_path / "session")
    view = json.loads(cli(cluster, "view", "--json").stdout)
    key = next(f"c{i}" for i in range(100) if _shard(view, f"c{i}") == "A")
    os.kill(cluster.procs[1].pid, signal.SIGSTOP)  # node 2 (A's other replica) hears nothing
    try:
        r = cli(cluster, "put", key, "v1", session=session, nodes=(0,))
        assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr
        token = json.loads(Path(session).read_text())
        assert key in token["deps"]  # not yet on every replica: the session remembers it
        reader = subprocess.Popen(
            [sys.executable, "-m", "trio_kv", "get", key, "--node", node(cluster, 1)],
            env={**os.environ, "TRIO_KV_SESSION": session}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
    finally:
        os.kill(cluster.procs[1].pid, signal.SIGCONT)
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0 and out.strip() == "v1", err  # it waited, never stale
    r = cli(cluster, "get", key, "--json", session=session, nodes=(3,))  # through shard B
    assert r.returncode == 0 and json.loads(r.stdout) == {"key": key, "value": "v1"}


def _shard(view: dict, key: str) -> str:
    from trio_kv.view import parse_view

    return parse_view({"view": view["view"]}).shard_for(key)


def test_cli_commands_outputs_and_exit_codes(cluster, tmp_path):
    session = str(tmp_path / "s")
    for i in range(6):
        assert cli(cluster, "put", f"k{i}", f"v{i}", session=session,
                   nodes=(i % 5,)).returncode == 0
    r = cli(cluster, "put", "piped", "-", session=session, stdin="from stdin")
    assert r.returncode == 0
    r = cli(cluster, "get", "piped", session=session, nodes=(4,))  # via the router
    assert r.stdout == "from stdin\n"
    r = cli(cluster, "get", "missing", session=session)
    assert r.returncode == 1 and "does not exist" in r.stderr and r.stdout == ""
    r = cli(cluster, "get", "missing", "--json", session=session)
    assert r.returncode == 1 and json.loads(r.stderr)["status"] == 404
    r = cli(cluster, "delete", "k0", session=session, nodes=(2,))
    assert r.returncode == 0 and r.stdout.strip() == "deleted"
    assert cli(cluster, "delete", "k0", session=session).returncode == 1
    r = cli(cluster, "ls", "--json", "--page-size", "2", session=session, nodes=(1,))
    items = {k: v for k, v in json.loads(r.stdout)["items"].items() if k[0] in "kp"}
    assert items == {**{f"k{i}": f"v{i}" for i in range(1, 6)}, "piped": "from stdin"}
    r = cli(cluster, "ls", session=session, nodes=(4,))
    assert "k1\tv1" in r.stdout.splitlines()
    r = cli(cluster, "status", nodes=(0, 4))
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and "shard A" in lines[0] and "shard -" in lines[1]
    r = cli(cluster, "view", nodes=(4,))
    assert "(none: routing)" in r.stdout and "A: 1@" in r.stdout
    r = cli(cluster, "get", "x", "--node", "nonsense")
    assert r.returncode == 2 and "host:port" in r.stderr
    dead = _free_ports(1)[0]
    r = subprocess.run([sys.executable, "-m", "trio_kv", "get", "x", "--retries", "1",
                        "--node", f"127.0.0.1:{dead}"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 3 and "cannot connect" in r.stderr
    Path(session).write_text("not json")
    r = cli(cluster, "get", "k1", session=session)
    assert r.returncode == 2 and "session file" in r.stderr


def test_sync_client_and_asyncio_client_share_a_session(cluster):
    nodes = [node(cluster, i) for i in range(5)]
    with Client(nodes) as kv:
        kv.put("sync", "1")
        assert kv.get("sync") == "1"
        token = kv.session
        with pytest.raises(KeyNotFound):
            kv.get("never-written")

    async def main() -> tuple[str, dict[str, str]]:
        async with AsyncClient(list(reversed(nodes)), session=token) as akv:
            await akv.put("async", "2")
            return await akv.get("sync"), await akv.items()

    value, items = asyncio.run(main())  # anyio under asyncio, not trio
    assert value == "1" and items["sync"] == "1" and items["async"] == "2"


def test_serve_subcommand_and_bare_options_both_run_a_node(tmp_path):
    port = _free_ports(1)[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_kv", "serve", "--id", "9", "--host", "127.0.0.1",
         "--port", str(port), "--log-format", "json", "--access-log", "true"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        p = Procs([port])
        p.procs[0] = proc
        p.wait_up()
        r = httpx.get(p.url(0) + "/ping", headers={"x-request-id": "trace-me-1"})
        assert r.json()["id"] == 9 and r.headers["x-request-id"] == "trace-me-1"
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=10)
    lines = [json.loads(line) for line in err.splitlines()]
    access = [e for e in lines if e["logger"] == "trio_kv.access" and e["path"] == "/ping"]
    assert access[-1]["request_id"] == "trace-me-1" and access[-1]["node"] == 9
    r = subprocess.run([sys.executable, "-m", "trio_kv", "--id", "1", "--log-format", "xml"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--log-format" in r.stderr.splitlines()[0]
    r = subprocess.run([sys.executable, "-m", "trio_kv", "--help"], capture_output=True,
                       text=True, timeout=30)
    assert "in seconds" in r.stdout and "KV_WAIT_DEADLINE" in r.stdout
