"""py-spy under load: record collapsed stacks of a node while wrk drives it, then rank.

py-spy runs in its default (blocking) mode: it pauses the target briefly per sample, which
costs a few percent of throughput but yields whole stacks (the non-blocking mode lost about a
third of the samples on this stack). Idle samples are excluded, so shares are of busy CPU.
Raw stacks (`*.collapsed`) load directly into speedscope or flamegraph.pl; `*.svg` is a small
flame graph drawn here so no extra tool is needed.
"""

from __future__ import annotations

import asyncio
import html
import shutil
import sys
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

TOP = 25


def pyspy() -> str:
    venv = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "py-spy"
    for cand in (Path(sys.executable).parent / "py-spy", venv, shutil.which("py-spy")):
        if cand and Path(cand).exists():
            return str(cand)
    raise RuntimeError("py-spy not found: pip install py-spy (into the venv)")


async def record(
    pids: dict[str, int], base: Path, duration: float, load: Awaitable[Any]
) -> dict[str, dict[str, Any]]:
    """Sample each pid (one py-spy each) for `duration` s while `load` runs; rank hot spots."""
    base.parent.mkdir(parents=True, exist_ok=True)
    spies = {}
    for name, pid in pids.items():
        raw = base.parent / f"{base.name}-{name}.collapsed"
        spies[name] = (
            raw,
            await asyncio.create_subprocess_exec(
                pyspy(), "record", "--pid", str(pid),
                "--duration", str(max(1, round(duration))),
                "--rate", "100", "--format", "raw", "-o", str(raw),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            ),
        )  # fmt: skip
    await asyncio.sleep(0.3)  # attach before the load starts
    load_result = await load
    results: dict[str, dict[str, Any]] = {}
    for name, (raw, proc) in spies.items():
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), duration + 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError("py-spy did not finish") from None
        if proc.returncode != 0 or not raw.exists():
            raise RuntimeError(f"py-spy failed: {out.decode(errors='replace')[-400:]}")
        stacks = parse(raw.read_text())
        res = rank(stacks)
        svg = raw.with_suffix(".svg")
        svg.write_text(flamegraph(stacks, f"{base.name} {name} (pid {pids[name]})"))
        res["files"] = {"collapsed": str(raw), "svg": str(svg)}
        res["load"] = getattr(load_result, "as_dict", lambda: None)()
        results[name] = res
    return results


def parse(text: str) -> list[tuple[list[str], int]]:
    """Collapsed lines `f1;f2;...;fn count` -> [(frames root-first, count)]."""
    out = []
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            out.append((stack.split(";"), int(n)))
    return out


def _func(frame: str) -> str:
    """`name (path/file.py:123)` -> `name (path/file.py)`: aggregate over lines."""
    name, _, loc = frame.partition(" (")
    return f"{name} ({loc.rsplit(':', 1)[0]})" if loc else name


def package(frame: str) -> str:
    """Top-level package of a frame's file; our own code is `trio_kv`."""
    loc = frame.partition(" (")[2].rstrip(")")
    path = loc.rsplit(":", 1)[0]
    if "trio_kv/" in path:
        return "trio_kv"
    if path.startswith("<attrs generated"):  # attrs-made __init__/__eq__ of trio classes
        return path.split()[-1].split(".")[0].rstrip(">") or "?"
    if "/" not in path:
        return f"stdlib:{path}" if path else "?"
    first = path.split("/")[0]
    return first or "?"


# Exclusive attribution by layer: each sample goes to the innermost frame that belongs to one
# of these (so trio's socket calls count for whoever made them: server, peer client, ...).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("json", ("json/", "orjson")),
    ("logging", ("logging/",)),
    ("peer-client", ("httpx/", "httpcore/")),
    ("server", ("hypercorn/", "h11/")),
    ("starlette", ("starlette/",)),
    ("trio_kv", ("trio_kv/",)),
)


def _is_entry(frame: str) -> bool:
    """Frames every sample has (the process entry point): not a hot spot."""
    return "trio_kv/__main__.py" in frame or frame.startswith("<module>")


def layers(stacks: list[tuple[list[str], int]]) -> list[tuple[str, float]]:
    """Share of samples per layer: server = hypercorn/h11, peer-client = httpx/httpcore,
    trio-only = trio's scheduler and IO loop with no other layer on the stack."""
    total = sum(n for _, n in stacks) or 1
    c: Counter[str] = Counter()
    for frames, n in stacks:
        who = "trio-only"  # scheduler/IO loop with no layer frame above it
        for f in reversed(frames):
            if _is_entry(f):
                continue
            hit = next((name for name, needles in LAYERS if any(x in f for x in needles)), None)
            if hit:
                who = hit
                break
        c[who] += n
    return [(k, v / total) for k, v in c.most_common()]


def rank(stacks: list[tuple[list[str], int]]) -> dict[str, Any]:
    total = sum(n for _, n in stacks) or 1
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    for frames, n in stacks:
        if not frames:
            continue
        self_c[_func(frames[-1])] += n
        pkg[package(frames[-1])] += n
        for f in {_func(f) for f in frames}:
            incl[f] += n
    ours = Counter({f: n for f, n in incl.items() if "trio_kv/" in f and not _is_entry(f)})
    return {
        "samples": total,
        "self": [(f, n / total) for f, n in self_c.most_common(TOP)],
        "inclusive": [(f, n / total) for f, n in incl.most_common(TOP)],
        "trio_kv_inclusive": [(f, n / total) for f, n in ours.most_common(TOP)],
        "by_package": [(p, n / total) for p, n in pkg.most_common()],
        "layers": layers(stacks),
    }


def flamegraph(stacks: list[tuple[list[str], int]], title: str, width: int = 1400) -> str:
    """A minimal static SVG flame graph (hover titles show name and share)."""
    tree: dict[str, Any] = {"n": 0, "c": {}}
    for frames, n in stacks:
        node = tree
        node["n"] += n
        for f in frames:
            node = node["c"].setdefault(f, {"n": 0, "c": {}})
            node["n"] += n
    total = tree["n"] or 1
    rows: list[str] = []
    h = 16
    maxdepth = 0

    def walk(node: dict[str, Any], x: float, depth: int) -> None:
        nonlocal maxdepth
        for name, child in sorted(node["c"].items()):
            w = child["n"] / total * width
            if w >= 0.5:
                maxdepth = max(maxdepth, depth)
                hue = 20 + (hash(package(name)) % 40)
                label = html.escape(name)
                text = html.escape(name.split(" (")[0][: int(w / 7)]) if w > 30 else ""
                rows.append(
                    f"<g><title>{label} ({child['n']} samples, {child['n'] / total:.1%})</title>"
                    f'<rect x="{x:.1f}" y="{{Y{depth}}}" width="{w:.1f}" height="{h - 1}" '
                    f'fill="hsl({hue},80%,60%)"/><text x="{x + 2:.1f}" y="{{T{depth}}}" '
                    f'font-size="11">{text}</text></g>'
                )
                walk(child, x, depth + 1)
            x += w

    walk(tree, 0.0, 0)
    height = (maxdepth + 2) * h + 20
    body = "\n".join(rows)
    for d in range(maxdepth + 1):
        y = height - (d + 1) * h - 4
        body = body.replace(f'"{{Y{d}}}"', f'"{y}"').replace(f'"{{T{d}}}"', f'"{y + 11}"')
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="monospace"><text x="4" y="14" font-size="12">'
        f"{html.escape(title)}: {total} samples</text>\n{body}\n</svg>\n"
    )
