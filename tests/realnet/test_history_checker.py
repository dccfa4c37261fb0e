"""The causal history checker on small hand-made histories (plain pytest, no root needed).

A checker that never complains is worthless, so every bad pattern has a history that must be
caught, and every legal-but-tricky behaviour (concurrent writes, unknown outcomes, deletes) a
history that must pass.
"""

from __future__ import annotations

import pytest

from chaos.history import Op, Outcome, check, check_convergence


class Builder:
    """Builds histories: one call per operation, in real-time order."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def _add(self, client: str, kind: str, key: str, value: str | None, *,
             status: int = 200, outcome: Outcome = "ok") -> Op:
        t = float(len(self.ops))
        op = Op(id=len(self.ops), client=client, kind=kind, key=key, value=value,  # type: ignore[arg-type]
                start=t, end=t + 0.5, status=status, outcome=outcome)
        self.ops.append(op)
        return op

    def put(self, client: str, key: str, value: str, outcome: Outcome = "ok") -> Op:
        return self._add(client, "put", key, value, status=200 if outcome == "ok" else 503,
                         outcome=outcome)

    def get(self, client: str, key: str, value: str | None) -> Op:
        return self._add(client, "get", key, value, status=404 if value is None else 200)

    def delete(self, client: str, key: str, found: bool = True) -> Op:
        return self._add(client, "delete", key, None, status=200 if found else 404)

    def failed_get(self, client: str, key: str) -> Op:
        return self._add(client, "get", key, None, status=503, outcome="fail")


def kinds(b: Builder, final: dict[str, str | None] | None = None) -> list[str]:
    return [a.kind for a in check(b.ops, final)]


# ---- histories that must pass -------------------------------------------------------------

def test_empty_history() -> None:
    assert check([]) == []


def test_read_your_writes_and_causal_chain_pass() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    b.get("c1", "x", "a")
    b.get("c2", "x", "a")
    b.put("c2", "y", "b")
    b.get("c3", "y", "b")
    b.get("c3", "x", "a")
    assert kinds(b) == []


def test_concurrent_writes_seen_in_one_order_pass() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    b.put("c2", "x", "b")
    b.get("c3", "x", "a")
    b.get("c3", "x", "b")
    b.get("c4", "x", "b")
    assert kinds(b, {"x": "b"}) == []


def test_not_found_before_any_causal_write_passes() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    b.get("c2", "x", None)  # c2 never saw the write: not-found is allowed
    b.get("c2", "x", "a")
    assert kinds(b) == []


def test_unknown_outcome_write_may_be_read_but_is_not_in_session() -> None:
    b = Builder()
    b.put("c1", "x", "a", outcome="info")
    b.get("c1", "x", None)  # the client never got the write's metadata
    b.get("c2", "x", "a")  # yet the write did happen
    assert kinds(b) == []


def test_failed_reads_are_ignored() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    b.failed_get("c1", "x")
    assert kinds(b) == []


def test_delete_then_not_found_passes() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    b.delete("c1", "x")
    b.get("c1", "x", None)
    assert kinds(b, {"x": None}) == []


def test_concurrent_delete_may_win_over_a_seen_write() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    b.delete("c2", "x")
    b.get("c3", "x", "a")
    b.get("c3", "x", None)  # the concurrent delete won the arbitration
    assert kinds(b, {"x": None}) == []


def test_final_state_either_concurrent_write_may_win() -> None:
    for winner in ("a", "b"):
        b = Builder()
        b.put("c1", "x", "a")
        b.put("c2", "x", "b")
        assert kinds(b, {"x": winner}) == []


# ---- histories that must be caught ---------------------------------------------------------

def test_thin_air_read() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    b.get("c2", "x", "zzz")
    assert kinds(b) == ["ThinAirRead"]


def test_value_from_another_key_is_thin_air() -> None:
    b = Builder()
    b.put("c1", "y", "a")
    b.get("c2", "x", "a")
    anomalies = check(b.ops)
    assert [a.kind for a in anomalies] == ["ThinAirRead"]
    assert "another key" in anomalies[0].detail


def test_cyclic_causal_order() -> None:
    b = Builder()
    b.get("c1", "x", "b")
    b.put("c1", "y", "a")
    b.get("c2", "y", "a")
    b.put("c2", "x", "b")
    assert kinds(b) == ["CyclicCO"]


def test_read_your_writes_violation() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    b.get("c1", "x", None)
    assert kinds(b) == ["WriteCOInitRead"]


def test_causal_chain_violation_across_clients() -> None:
    """The partition scenario: c3 saw y, which c2 wrote after reading x; x must be visible."""
    b = Builder()
    b.put("c1", "x", "a")
    b.get("c2", "x", "a")
    b.put("c2", "y", "b")
    b.get("c3", "y", "b")
    b.get("c3", "x", None)
    anomalies = check(b.ops)
    assert [a.kind for a in anomalies] == ["WriteCOInitRead"]
    assert anomalies[0].ops == (0, 4)


def test_delete_before_write_does_not_excuse_not_found() -> None:
    b = Builder()
    b.delete("c1", "x")
    b.put("c1", "x", "a")
    b.get("c1", "x", None)
    assert kinds(b) == ["WriteCOInitRead"]


def test_monotonic_writes_violation_is_a_stale_read() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    b.put("c1", "x", "b")
    b.get("c2", "x", "b")
    b.get("c2", "x", "a")
    assert kinds(b) == ["WriteCORead"]


def test_stale_read_after_writes_follow_reads() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    b.get("c2", "x", "a")
    b.put("c2", "x", "b")
    b.get("c3", "x", "b")
    b.get("c3", "x", "a")
    assert kinds(b) == ["WriteCORead"]


def test_read_after_causal_delete_is_stale() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    b.delete("c1", "x")
    b.get("c1", "x", "a")
    assert kinds(b) == ["WriteCORead"]


def test_replicas_disagreeing_on_conflict_order_is_cyclic_cf() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    b.put("c2", "x", "b")
    b.get("c3", "x", "a")
    b.get("c3", "x", "b")  # says a < b
    b.get("c4", "x", "b")
    b.get("c4", "x", "a")  # says b < a
    assert kinds(b) == ["CyclicCF"]


def test_final_state_lost_write() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    assert kinds(b, {"x": None}) == ["WriteCOInitRead"]


def test_final_state_that_lost_to_a_causally_later_write() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    b.put("c1", "x", "b")
    assert kinds(b, {"x": "a"}) == ["WriteCORead"]


def test_final_state_contradicting_a_read_order() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    b.put("c2", "x", "b")
    b.get("c3", "x", "a")
    b.get("c3", "x", "b")  # a < b, so b must be the converged value
    assert kinds(b, {"x": "a"}) == ["CyclicCF"]


def test_final_state_never_written() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    assert kinds(b, {"x": "nope"}) == ["ThinAirRead"]


def test_repeated_value_is_rejected() -> None:
    b = Builder()
    b.put("c1", "x", "a")
    b.put("c2", "x", "a")
    with pytest.raises(ValueError, match="not differentiated"):
        check(b.ops)


def test_checker_is_fast_enough_for_a_chaos_run() -> None:
    """A 60 s chaos run records a few thousand operations; checking must take seconds."""
    import time

    b = Builder()
    for i in range(1500):
        c = f"c{i % 4}"
        key = f"k{i % 10}"
        b.put(c, key, f"v{i}")
        b.get(c, key, f"v{i}")
    t = time.monotonic()
    assert check(b.ops, {f"k{k}": f"v{1490 + k}" for k in range(10)}) == []
    assert time.monotonic() - t < 20


# ---- convergence -------------------------------------------------------------------------

def test_convergence_identical_replicas() -> None:
    shards = {"s1": ["n1", "n2"], "s2": ["n3"]}
    items = {"n1": {"a": "1"}, "n2": {"a": "1"}, "n3": {"b": "2"}}
    assert check_convergence(items, shards) == []


def test_convergence_reports_differences_and_silence() -> None:
    shards = {"s1": ["n1", "n2"], "s2": ["n3", "n4"]}
    items = {"n1": {"a": "1"}, "n2": {"a": "2", "c": "3"}, "n3": {}, "n4": None}
    problems = check_convergence(items, shards)
    assert len(problems) == 2
    assert "differ on 2 key(s)" in problems[0]
    assert "no answer from n4" in problems[1]
