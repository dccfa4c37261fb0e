"""What goes into the core and what comes out: frozen dataclasses, no I/O.

Inputs are method calls on ``Core`` (a client request, a peer message, the outcome of a call,
a timer tick), each with the time.  Outputs are these decisions, which the shell (``node.py``)
or the simulator (``sim/``) carries out, in this order: persist, then send, then answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..metadata import Deps

if TYPE_CHECKING:
    from ..listing import Page


@dataclass(frozen=True, slots=True)
class Request:
    """One client data request (``key`` None means ``GET /data``), as the edge validated it."""

    method: str
    key: str | None
    deps: Deps
    value: str | None = None
    hops: int = 0
    budget: float | None = None  # seconds the forwarding node lets us wait
    write_id: str | None = None  # a forwarded write: a retry gets the same answer
    retry: bool = False  # sent again after an attempt whose outcome the sender cannot know
    page: Page | None = None  # GET /data?limit=&after=: one page of the listing
    request_id: str | None = None  # follows the request through forwards (X-Request-Id)


@dataclass(frozen=True, slots=True)
class Reply:
    """A data answer: JSON payload, or a forwarded peer's raw body passed through unchanged."""

    status: int
    payload: dict[str, Any] | None = None
    raw: bytes | None = None


# ------------------------------------------------------------------ outputs
@dataclass(frozen=True, slots=True)
class Respond:
    """Answer request ``rid`` (a data request or a ``PUT /view``)."""

    rid: int
    reply: Reply


@dataclass(frozen=True, slots=True)
class Call:
    """Send one HTTP request to a peer, bounded by ``timeout`` seconds in all; report its
    outcome with ``Core.call_done(cid, ...)``.  ``lane`` picks the connection pool."""

    cid: int
    address: str
    method: str
    path: str
    body: bytes | None
    headers: tuple[tuple[str, str], ...]
    timeout: float
    lane: str  # "peer" (replication, view change) or "forward" (client requests)


@dataclass(frozen=True, slots=True)
class Cancel:
    """Call ``cid`` is no longer wanted; its outcome would be ignored."""

    cid: int


@dataclass(frozen=True, slots=True)
class Wake:
    """Call ``Core.tick`` at ``at`` (the earliest timer changed)."""

    at: float


@dataclass(frozen=True, slots=True)
class Log:
    level: int
    message: str


@dataclass(frozen=True, slots=True)
class Persist:
    """Make what changed durable before the sends and answers that follow it (first in the
    list when present).  ``state``: the view or custody (debts, pulls, fences) changed too,
    not only data."""

    state: bool = False


Output = Respond | Call | Cancel | Wake | Log | Persist


# ------------------------------------------------------------------ call outcomes
@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Failed:
    """No answer.  ``not_sent``: provably never reached the peer (refused, no connection);
    ``too_large``: the answer was over ``max_peer_message_bytes``."""

    reason: str
    not_sent: bool = False
    too_large: bool = False


Outcome = Answer | Failed
