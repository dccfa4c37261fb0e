"""Real processes: a 2 -> 4 shard change with 2,000 keys over HTTP, no loss, ~half moved."""

from __future__ import annotations

import httpx

from trio_kv.view import parse_view

from .test_processes import Procs, _free_ports


def _view(ports: list[int], shards: int) -> dict:
    per = len(ports) // shards
    return {"view": {f"s{s}": [{"address": f"127.0.0.1:{ports[i]}", "id": i + 1}
                               for i in range(s * per, (s + 1) * per)] for s in range(shards)}}


def test_two_to_four_shards_with_2000_keys() -> None:
    ports = _free_ports(8)
    procs = Procs(ports)
    for i in range(8):
        procs.start(i)
    try:
        procs.wait_up()
        with httpx.Client(timeout=30) as c:
            old = _view(ports[:4], 2)
            for i in range(8):
                assert c.put(procs.url(i) + "/view", json=old).status_code == 200
            keys = {f"key-{n}": f"value-{n}" for n in range(2000)}
            for n, (k, v) in enumerate(keys.items()):
                r = c.put(procs.url(n % 4) + f"/data/{k}", json={"value": v})
                assert r.status_code == 200, r.text
            new = _view(ports, 4)
            # every node changes concurrently, as an operator's script would do it
            import concurrent.futures as cf

            with cf.ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(
                    lambda i: httpx.put(procs.url(i) + "/view", json=new, timeout=30).status_code,
                    range(8)))
            assert statuses == [200] * 8
            after: dict[int, dict[str, str]] = {}
            for i in (0, 2, 4, 6):
                r = c.get(procs.url(i) + "/data")
                assert r.status_code == 200, r.text[:300]
                after[i] = r.json()["items"]
            union: dict[str, str] = {}
            for items in after.values():
                assert not set(items) & set(union), "a key on two shards"
                union.update(items)
            assert union == keys, f"lost {len(set(keys) - set(union))} keys"
            old_view, new_view = parse_view(old), parse_view(new)
            for i, shard in zip((0, 2, 4, 6), ("s0", "s1", "s2", "s3"), strict=True):
                assert all(new_view.shard_for(k) == shard for k in after[i])
            moved = sum(old_view.shard_for(k) != new_view.shard_for(k) for k in keys)
            fraction = moved / len(keys)
            print(f"moved fraction {fraction:.3f} (ideal 0.5)")
            assert 0.35 <= fraction <= 0.65
            sent = sum(c.get(procs.url(i) + "/view").json()["change"]["keys_sent"]
                       for i in range(4))
            # each moved key goes from each of 2 old replicas to each of 2 new ones at most
            assert sent <= 4 * moved
            for n, (k, v) in enumerate(keys.items()):
                if n % 50 == 0:
                    r = c.get(procs.url(n % 8) + f"/data/{k}")
                    assert r.status_code == 200 and r.json()["value"] == v
    finally:
        for proc in procs.procs.values():
            proc.kill()
            proc.wait(5)
