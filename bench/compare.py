#!/usr/bin/env python3
"""Compare two suite runs row by row (before/after an optimisation).

    python3 bench/compare.py bench/out/<old>/results.json bench/out/latest.json

Matches rows by section and case and prints, for load rows, req/s and the ratio to the
ceiling (or to one node) of both runs; other rows side by side. Ratios are what to compare:
absolute rates drift with whatever else the machine is doing.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

RATE = re.compile(r"([\d,]+) req/s")
RATIO = re.compile(r"([\d.]+)x (ceiling|1 node)")


def load(path: str) -> tuple[dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
    d = json.loads(Path(path).read_text())
    return d, {(r["section"], r["case"]): r for r in d["rows"]}


def short(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    m, q = RATE.search(r["result"]), RATIO.search(r["ratio"])
    if m:
        noisy = " NOISY" if "NOISY" in r["result"] else ""
        return f"{m.group(1)} req/s" + (f" {q.group(1)}x" if q else "") + noisy
    return str(r["result"] + (f" ({r['ratio']})" if r["ratio"] else ""))[:60]


def main(a: str, b: str) -> None:
    da, ra = load(a)
    db, rb = load(b)
    print(
        f"A: {da['stamp']} commit {da['machine']['commit']}   B: {db['stamp']} commit "
        f"{db['machine']['commit']}"
    )
    keys = list(ra) + [k for k in rb if k not in ra]
    w = max(len(f"{s} | {c}") for s, c in keys)
    for k in keys:
        if k[0].startswith("8 "):
            continue  # profiles: compare the flame graphs instead
        x, y = ra.get(k), rb.get(k)
        delta = ""
        qa = RATIO.search(x["ratio"]) if x else None
        qb = RATIO.search(y["ratio"]) if y else None
        if qa and qb:
            delta = f"{float(qb.group(1)) - float(qa.group(1)):+.2f}x"
        print(f"{(k[0] + ' | ' + k[1]).ljust(w)}  {short(x):<42} {short(y):<42} {delta}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
