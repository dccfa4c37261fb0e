"""Schemathesis against /openapi.json of live node processes: requests generated from the
document (valid and invalid) never get a 5xx, every error is JSON with "error", and answers
match the document.  Two shards and a router, so forwarding is exercised too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings

from trio_kv.client import Client

from .test_processes import Procs, _free_ports

schemathesis = pytest.importorskip("schemathesis")
SECRET = "fuzz-secret"  # generated views lack it: PUT /view is fuzzed and must answer 401
IN_CI = bool(os.environ.get("CI"))  # CI runs one fixed set of examples; locally they vary
EXAMPLES = int(os.environ.get("KV_FUZZ_EXAMPLES", "25"))  # per operation and mode


class QuickProcs(Procs):
    """Nodes whose causal waits end quickly: generated tokens name writes that never come."""

    def start(self, i: int) -> None:
        env = {**os.environ, "NODE_IDENTIFIER": str(i + 1), "KV_WAIT_DEADLINE": "0.2",
               "KV_CLUSTER_SECRET": SECRET}
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "trio_kv", "--host", "127.0.0.1", "--port", str(self.ports[i])],
            env=env, stdout=subprocess.DEVNULL,
            stderr=open(f"{self.logdir}/node{i + 1}.log", "ab"),  # noqa: SIM115
        )


def _names_an_empty_key(case: Any) -> bool:
    """OpenAPI 3.0 has no propertyNames, so the generator may put "" in a token's deps,
    which the document's description (and the node) refuse."""
    tokens = []
    if isinstance(case.body, dict):
        tokens.append(case.body.get("causal-metadata"))
    header = (case.headers or {}).get("X-Causal-Metadata")
    if isinstance(header, str):
        try:
            tokens.append(json.loads(header))
        except ValueError:
            return False
    return any(isinstance(t, dict) and isinstance(t.get("deps"), dict) and "" in t["deps"]
               for t in tokens)


def unavailable_for_a_made_up_token(case: Any, response: Any) -> bool:
    """The one 5xx the contract gives valid input: a token naming writes that never arrive
    (generated timestamps) is waited on until the deadline, then 503."""
    return response.status_code == 503 and "causal dependencies" in response.json()["error"]


@pytest.fixture(scope="module")
def live() -> Iterator[Procs]:
    with QuickProcs(_free_ports(3)).running() as p:
        view = {"view": {"A": [{"address": f"127.0.0.1:{p.ports[0]}", "id": 1}],
                         "B": [{"address": f"127.0.0.1:{p.ports[1]}", "id": 2}]}}
        with Client([f"127.0.0.1:{port}" for port in p.ports], secret=SECRET) as kv:
            kv.put_view(view)  # to nodes 1 and 2
        with httpx.Client(timeout=20) as c:  # node 3 gets it too, and is in no shard: it routes
            r = c.put(p.url(2) + "/view", json=view, headers={"x-kv-secret": SECRET})
            assert r.status_code == 200
        yield p


def _operations(live: Procs) -> list[Any]:
    schema = schemathesis.openapi.from_url(live.url(2) + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_generated_requests(live: Procs, mode: str) -> None:
    """Valid requests from the document, then invalid ones (schemathesis' negative mode)."""
    generation = schemathesis.GenerationMode(mode)
    for op in _operations(live):
        if mode == "negative" and op.path in ("/metrics", "/openapi.json"):
            continue  # no parameters, no body: nothing to make invalid

        @given(case=op.as_strategy(generation_mode=generation))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=IN_CI,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            if mode == "positive":
                assume(not _names_an_empty_key(case))
            for node in (0, 2):  # an owner or forwarder, and the router
                response = case.call(base_url=live.url(node), timeout=20)
                if response.status_code >= 400:
                    assert isinstance(response.json().get("error"), str), response.text
                if unavailable_for_a_made_up_token(case, response):
                    continue
                assert response.status_code < 500, (case.as_curl_command(), response.text)
                if case.method == "PUT" and case.path == "/view":
                    assert response.status_code in (400, 401), response.text  # never applied
                if mode == "positive":
                    case.validate_response(response)

        run()
