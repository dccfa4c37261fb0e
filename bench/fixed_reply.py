"""A fixed-reply HTTP server (asyncio protocol, no parsing beyond request boundaries).

Only there to show what wrk itself can drive on this machine: if wrk pushes this many times
the rate of the real servers, the load generator is not what limits the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

BODY = b'{"value":"v","causal-metadata":{}}'
REPLY = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)


class Fixed(asyncio.Protocol):
    """Answers every request head (GETs without bodies) with the same bytes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4 :]
            self.t.write(REPLY * n)  # type: ignore[attr-defined]


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Fixed, "127.0.0.1", port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    asyncio.run(main(ap.parse_args().port))
