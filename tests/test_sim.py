"""The simulator's sweep: seeds in every mode, each a whole run of cores and clients over a
simulated network with faults, checked for causal anomalies, lost writes and convergence.

A failing seed prints the one command that replays it, exactly.  ``KV_SIM_SEEDS=500`` (or
``500:1000``) runs more; ``KV_SIM_OPS`` sets the operations per run."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from trio_kv.sim.__main__ import replay_command
from trio_kv.sim.world import MODES, simulate


def _seeds(spec: str) -> range:
    first, _, last = spec.rpartition(":")
    return range(int(first or 0), int(last))


SEEDS = _seeds(os.environ.get("KV_SIM_SEEDS", "12"))
OPS = int(os.environ.get("KV_SIM_OPS", "400"))


@pytest.mark.parametrize("mode", list(MODES))
def test_sim_sweep(mode: str) -> None:
    failed = []
    for seed in SEEDS:
        result = simulate(seed, OPS, mode)
        if result.anomalies or result.lost:
            failed.append(f"{result.line()}\n  {result.anomalies[:3]}\n  replay: "
                          f"{replay_command(seed, OPS, mode)}")
    assert not failed, "\n".join(failed)


def test_same_seed_same_digest() -> None:
    a, b = simulate(5, 300, "staggered"), simulate(5, 300, "staggered")
    assert a.digest == b.digest and a.ops == b.ops == 300
    assert simulate(6, 300, "staggered").digest != a.digest


def test_digest_does_not_depend_on_string_hashing() -> None:
    """Another process with another hash seed replays the same run byte for byte."""
    outs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run(
            [sys.executable, "-m", "trio_kv.sim", "--seed", "9", "--ops", "300", "--mode",
             "faults+views"], capture_output=True, text=True, env=env, check=False,
        )
        outs.append(run.stdout.strip().splitlines()[-1])
    assert outs[0] == outs[1] and outs[0].startswith("seed=9 ops=300 anomalies=0 lost=0 digest=")


def test_two_thousand_operations_in_well_under_thirty_seconds() -> None:
    began = time.monotonic()
    result = simulate(1, 2000, "faults+views")
    assert result.ops == 2000 and not result.anomalies
    assert time.monotonic() - began < 30  # a generous sanity bound; the bench has the figure


def test_the_simulator_imports_no_io_library() -> None:
    code = ("import sys, trio_kv.sim, trio_kv.sim.__main__; "
            "bad = {'trio', 'httpx', 'hypercorn', 'starlette', 'anyio'} & set(sys.modules); "
            "print(sorted(bad))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert run.stdout.strip() == "[]"
