"""The pure core of a node: every protocol decision, no I/O (see ``core.py``)."""

from .core import Core
from .events import (
    Answer,
    Call,
    Cancel,
    Failed,
    Log,
    Outcome,
    Output,
    Persist,
    Reply,
    Request,
    Respond,
    Wake,
)

__all__ = [
    "Answer", "Call", "Cancel", "Core", "Failed", "Log", "Outcome", "Output", "Persist", "Reply",
    "Request", "Respond", "Wake",
]
