"""The core's runtime: the clock it was given, timers, calls in flight, the outbox, the RNG.

Nothing here reads a clock or does I/O: ``now`` and ``wall_ms`` are set by each input, timers
fire when the caller ticks, and calls are decisions the caller carries out.
"""

from __future__ import annotations

import heapq
import logging
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from .events import Call, Cancel, Log, Outcome, Output, Wake

OnDone = Callable[[Outcome], None]


@dataclass(eq=False)
class Timer:
    at: float  # when it fires at the latest (the node wakes for it); earlier with slack
    fn: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Kernel:
    rng: random.Random
    now: float = 0.0
    wall_ms: int = 0
    out: list[Output] = field(default_factory=list)
    _timers: list[tuple[float, int, Timer]] = field(default_factory=list)
    _ripening: list[tuple[float, int, Timer]] = field(default_factory=list)  # by when slack starts
    _seq: int = 0
    _calls: dict[int, OnDone] = field(default_factory=dict)
    _cid: int = 0
    failures: int = 0  # timers and call outcomes whose handler raised (each logged)

    def failed(self, what: str) -> None:
        """A handler raised: count it and log it with its traceback; the node goes on (the
        handler's owner retries, or the change deadline moves past it)."""
        self.failures += 1
        self.log(logging.ERROR, f"{what} failed:\n{traceback.format_exc()}")

    def emit(self, output: Output) -> None:
        self.out.append(output)

    def log(self, level: int, message: str) -> None:
        self.out.append(Log(level, message))

    def take(self) -> list[Output]:
        out, self.out = self.out, []
        return out

    # ------------------------------------------------------------ timers
    def at(self, when: float, fn: Callable[[], None], slack: float = 0.0) -> Timer:
        """Run ``fn`` at ``when``; with ``slack``, at the first input from ``when`` on (the
        node is awake anyway), waking the node for it only at ``when + slack``.  Under load
        inputs come often, so such a timer costs no wake-up of its own."""
        latest = when + max(0.0, slack)
        timer = Timer(latest, fn)
        earliest = self.next_wake()
        self._seq += 1
        heapq.heappush(self._timers, (latest, self._seq, timer))
        if latest > when:
            heapq.heappush(self._ripening, (when, self._seq, timer))
        if earliest is None or latest < earliest:
            self.emit(Wake(latest))
        return timer

    def after(self, delay: float, fn: Callable[[], None]) -> Timer:
        return self.at(self.now + max(0.0, delay), fn)

    def next_wake(self) -> float | None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def fire_due(self) -> None:
        """Run every timer due by ``now``, or whose slack has begun (including ones armed
        by those that run).  Every input calls this: the shell's tick is just one more."""
        while True:
            if self._timers and self._timers[0][0] <= self.now:
                _at, _seq, timer = heapq.heappop(self._timers)
            elif self._ripening and self._ripening[0][0] <= self.now:
                _at, _seq, timer = heapq.heappop(self._ripening)
            else:
                return
            if not timer.cancelled:
                timer.cancelled = True
                try:
                    timer.fn()
                except Exception:
                    self.failed("a timer")

    # ------------------------------------------------------------ calls
    def call(
        self, address: str, method: str, path: str, body: bytes | None, timeout: float,
        on_done: OnDone, *, lane: str = "peer", headers: tuple[tuple[str, str], ...] = (),
    ) -> int:
        self._cid += 1
        self._calls[self._cid] = on_done
        self.emit(Call(self._cid, address, method, path, body, headers, timeout, lane))
        return self._cid

    def cancel(self, cid: int | None) -> None:
        if cid is not None and self._calls.pop(cid, None) is not None:
            self.emit(Cancel(cid))

    def done(self, cid: int, outcome: Outcome) -> None:
        on_done = self._calls.pop(cid, None)
        if on_done is not None:
            try:
                on_done(outcome)
            except Exception:
                self.failed(f"handling the outcome of call {cid}")

    def calls_in_flight(self) -> int:
        return len(self._calls)

    def jitter(self, low: float, high: float) -> float:
        return self.rng.uniform(low, high)
