"""Sending a channel's frames: batched per peer, and sent when this node goes idle.

A frame sent while this node still has tasks to run wakes the peer at once; on a shared core
the peer then preempts us, and each side pays a context switch and a cold cache for one
frame.  So frames wait until this node's event loop has nothing left to run (it is about to
wait for I/O) and then go out, everything queued for a peer together (one message of up to
``BATCH_BYTES``, as many as that takes), the way Redis writes its replies before it sleeps.
A lone call waits for nothing: its task blocks on the answer, the loop goes idle, the frame
goes.  A node that stays busy still sends once a frame has waited its ``linger`` (like
Kafka's ``linger.ms``; it bounds the wait for idleness, not a full socket or one long task
step).

The flush runs in the loop between task steps (a trio ``Instrument``'s ``before_io_wait``)
and never waits: what the socket does not take, and anything that needs waiting for, is left
to the outbox's writer task.  Callers never do I/O, so a caller's timeout never interrupts a
send that carries other calls' frames.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from .frames import BATCH_BYTES, MAX_FRAMES, pack

log = logging.getLogger("trio_kv.channel")


class Outbox:
    """Frames waiting to be sent on one connection.  Without ``try_send`` (a send that never
    waits) a writer task (``run``) sends them, everything queued each time it wakes as one
    message; with it, the idle flush sends them and the writer only finishes what the socket
    did not take.  ``sent`` is told which frames each send wrote, and says whether that woke
    a task (a server holds a call's slot until its answer is written, so a peer that does not
    read cannot make answers pile up)."""

    def __init__(
        self, send: Callable[[bytes], Awaitable[None]],
        sent: Callable[[list[bytes]], bool] | None = None,
        try_send: Callable[[bytes], int] | None = None,
        linger: float = 0.005,
        starting: Callable[[int, int], None] | None = None,
    ) -> None:
        self._send = send
        self._sent = sent
        self._starting = starting
        self._try_send = try_send
        self._linger = linger
        self._queue: deque[bytes] = deque()
        self._rest: tuple[bytes, list[bytes]] | None = None  # a message partly written
        self._sending = False
        self._wake = trio.Event()
        self._finishing = False
        self._error: Exception | None = None
        self.closed = False
        self.finished = trio.Event()

    def put(self, frame: bytes) -> None:
        self._queue.append(frame)
        if self._try_send is None:
            self._wake.set()
        else:
            _idle_flush().hold(self, self._linger)

    def close(self) -> None:
        """Stop now; frames still queued are dropped."""
        self.closed = True
        self._wake.set()

    def fail(self, error: Exception) -> None:
        """Stop now: sending failed outside the writer; the writer raises it to its owner."""
        self._error = error
        self.close()

    def finish(self) -> None:
        """Stop once every frame queued so far is sent."""
        self._finishing = True
        self._wake.set()

    def flush(self) -> bool:
        """Write what is queued without waiting (from the loop, between task steps); True if
        that woke a task: the writer, to send what the socket did not take, or a slot's
        waiter."""
        if self.closed or self._sending or self._rest is not None:
            return False  # the writer is sending: it sends the queue next
        assert self._try_send is not None
        woke = False
        while self._queue:
            frames = self._take()
            data = self._start(frames)
            try:
                written = self._try_send(data)
            except OSError:  # would block, or the connection broke: the writer finds out
                written = 0
            if written < len(data):
                self._rest = (data[written:], frames)
                self._wake.set()
                return True
            if self._sent is not None:
                woke = self._sent(frames) or woke
        return woke

    def _take(self) -> list[bytes]:
        """The next message's frames: as many as fit ``BATCH_BYTES`` (a larger one alone)."""
        queue = self._queue
        frames = [queue.popleft()]
        size = len(frames[0])
        while queue and size + len(queue[0]) <= BATCH_BYTES and len(frames) < MAX_FRAMES:
            size += len(queue[0])
            frames.append(queue.popleft())
        return frames

    async def run(self) -> None:
        """The writer: sends until closed or finished; a failed send raises (the connection's
        owner closes it)."""
        try:
            while not self.closed:
                if self._rest is not None:
                    await self._write(*self._rest)
                    self._rest = None
                while self._queue and not self.closed:
                    frames = self._take()
                    await self._write(self._start(frames), frames)
                if self._finishing:
                    return
                await self._wake.wait()
                self._wake = trio.Event()
            if self._error is not None:
                raise trio.BrokenResourceError("sending failed") from self._error
        finally:
            self.finished.set()

    def _start(self, frames: list[bytes]) -> bytes:
        """The next message, about to be handed to the socket; ``starting`` is told how many
        frames and bytes it holds (messages go out whole and in order)."""
        data = pack(frames)
        if self._starting is not None:
            self._starting(len(frames), len(data))
        return data

    async def _write(self, data: bytes, frames: list[bytes]) -> None:
        self._sending = True
        try:
            await self._send(data)
        finally:
            self._sending = False
        if self._sent is not None:
            self._sent(frames)


def try_send(stream: trio.SocketStream) -> Callable[[bytes], int]:
    """A send that never waits: the bytes the socket took now (``BlockingIOError`` when it
    took none).  Trio has no such call; writing to the descriptor is the same system call."""
    socket = stream.socket

    def send(data: bytes) -> int:
        return os.write(socket.fileno(), data)

    return send


class _IdleFlush(trio.abc.Instrument):
    """Flushes held outboxes when the loop is about to wait for I/O with nothing to run
    (``timeout`` > 0), or once the earliest held frame's linger is over.  The loop's timeout
    is also 0 when idle under ``MockClock``'s autojump or while a task is in
    ``wait_all_tasks_blocked``: idle then looks busy, frames wait out their linger in real
    time (an autojumping clock may meanwhile jump past a call's timeout), so tests of
    channels run on the real clock.  (Telling idle from busy exactly needs
    ``current_statistics()``, which walks every registered socket: too dear per loop pass.)"""

    def __init__(self) -> None:
        self._held: dict[Outbox, None] = {}
        self._due = math.inf
        self._token = trio.lowlevel.current_trio_token()

    def hold(self, outbox: Outbox, linger: float) -> None:
        self._held[outbox] = None
        due = time.perf_counter() + linger
        if due < self._due:
            self._due = due

    def before_io_wait(self, timeout: float) -> None:
        if not self._held or (timeout <= 0 and time.perf_counter() < self._due):
            return  # nothing held, or tasks still to run and no frame due yet
        held, self._held, self._due = self._held, {}, math.inf
        woke = False
        try:  # nothing may escape: trio drops an instrument that raises, and then every
            for outbox in held:  # later frame would wait forever
                try:
                    woke = outbox.flush() or woke
                except Exception as exc:  # a bug: that connection closes, the node goes on
                    log.exception("flushing a channel failed")
                    outbox.fail(exc)
                    woke = True
            if woke and timeout > 0:
                self._token.run_sync_soon(_nothing)  # a task is runnable: do not sleep
        except Exception:
            log.exception("flushing channels failed")


def _nothing() -> None:
    pass


_FLUSH: trio.lowlevel.RunVar[_IdleFlush] = trio.lowlevel.RunVar("trio_kv_idle_flush")


def _idle_flush() -> _IdleFlush:
    """The run's flush, installed on first use."""
    try:
        return _FLUSH.get()
    except LookupError:
        flush = _IdleFlush()
        trio.lowlevel.add_instrument(flush)
        _FLUSH.set(flush)
        return flush
