"""``python -m trio_kv.sim --seed N --ops M [--mode MODE]``: one simulated run; its last line is
``seed=N ops=M anomalies=A lost=L digest=HEX``, and it exits 1 on any anomaly or lost write.
``--sweep A:B`` runs seeds A..B-1 in every mode (``--mode`` picks one) and prints, for each
failure, the command that replays it."""

from __future__ import annotations

import argparse
import sys
import time

from .world import MODES, simulate


def replay_command(seed: int, ops: int, mode: str) -> str:
    return f"python -m trio_kv.sim --seed {seed} --ops {ops} --mode {mode}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trio_kv.sim", description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", type=int, default=2000, help="client operations (default 2000)")
    parser.add_argument("--mode", choices=[*MODES, "all"], default=None,
                        help="faults to inject (default faults+views; a sweep: all)")
    parser.add_argument("--sweep", metavar="A:B", help="run seeds A..B-1 (or a count)")
    parser.add_argument("--trace", action="store_true", help="print the whole trace")
    args = parser.parse_args(argv)
    if args.sweep:
        first, _, last = args.sweep.rpartition(":")
        modes = list(MODES) if args.mode in (None, "all") else [args.mode]
        failed: list[str] = []
        runs = 0
        began = time.monotonic()
        for seed in range(int(first or 0), int(last)):
            for mode in modes:
                result = simulate(seed, args.ops, mode)
                runs += 1
                if result.anomalies or result.lost:
                    failed.append(replay_command(seed, args.ops, mode))
                    print(f"FAIL {mode} {result.line()}: {result.anomalies[:2]}", flush=True)
        print(f"sweep: {runs} runs ({len(modes)} modes), {len(failed)} failed, "
              f"{time.monotonic() - began:.0f} s")
        for command in failed:
            print(f"replay: {command}")
        return 1 if failed else 0
    mode = "faults+views" if args.mode in (None, "all") else args.mode
    began = time.monotonic()
    result = simulate(args.seed, args.ops, mode, keep_trace=args.trace)
    if result.trace is not None:
        print("\n".join(result.trace))
    print(f"mode={mode} {result.summary} wall={time.monotonic() - began:.1f}s")
    for anomaly in result.anomalies[:10]:
        print(f"anomaly: {anomaly}")
    if result.anomalies or result.lost:
        print(f"replay: {replay_command(args.seed, args.ops, mode)}")
    print(result.line())
    return 1 if result.anomalies or result.lost else 0


if __name__ == "__main__":
    sys.exit(main())
