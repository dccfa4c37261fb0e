"""The history checker lives in ``trio_kv.checker`` (the simulator uses it too)."""

from trio_kv.checker import (
    FINAL,
    Anomaly,
    History,
    Op,
    OpKind,
    Outcome,
    check,
    check_convergence,
    merged_state,
)

__all__ = [
    "FINAL", "Anomaly", "History", "Op", "OpKind", "Outcome", "check", "check_convergence",
    "merged_state",
]
