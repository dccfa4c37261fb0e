"""The peer channel over real loopback sockets: a real node's app on the node's listener.

What it must keep from HTTP peer calls: every bound (timeouts, stalls, answer sizes), the
secret, ``not_sent`` only when provably not sent, and a node that survives any frame.
"""

from __future__ import annotations

import socket
import struct
import time
from functools import partial

import httpx
import orjson
import pytest
import trio
import trio.testing
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from trio_kv import channel, listener, tcpinfo
from trio_kv.api import build_app
from trio_kv.channel import ChannelClient
from trio_kv.channel_server import channel_server
from trio_kv.config import Config
from trio_kv.frames import (
    HEAD,
    MAX_FRAMES,
    MAX_HELLO,
    PREFACE,
    MessageReader,
    decode_answer,
    decode_request,
    encode_request,
    message,
    pack,
    unpack,
)
from trio_kv.node import Node
from trio_kv.outbox import Outbox
from trio_kv.transport import PeerClient, PeerUnavailable, real_transport
from trio_kv.view import parse_view

SECRET = "s3cret"


def _hyper_config() -> HyperConfig:
    cfg = HyperConfig()
    cfg.bind = ["127.0.0.1:0"]
    cfg.accesslog = None
    return cfg


async def _serve(nursery: trio.Nursery, app: Starlette) -> str:
    """The app and its channel on one port, as a node serves them."""
    binds = await nursery.start(partial(
        listener.serve, app, _hyper_config(), app.state.serve_channel,
        shutdown_trigger=trio.sleep_forever))
    return str(binds[0]).removeprefix("http://")


async def _serve_http_only(nursery: trio.Nursery, app: Starlette) -> str:
    """Plain hypercorn: an older node, without the channel."""
    binds = await nursery.start(partial(serve, app, _hyper_config()))  # type: ignore[arg-type]
    return str(binds[0]).removeprefix("http://")


async def _node(nursery: trio.Nursery, secret: str = "") -> tuple[Node, str]:
    node = Node(Config(node_id=1, host="127.0.0.1", cluster_secret=secret))
    await nursery.start(node.run)
    address = await _serve(nursery, build_app(node))
    view = parse_view({"view": {"s1": [{"id": 1, "address": address}]}})
    assert await node.put_view(view) is None
    return node, address


async def _no_direct(*args: object) -> None:
    return None  # every frame through the app


def _with_channel(app: Starlette, idle_timeout: float = 30, read_timeout: float = 10) -> None:
    """A test app's channel: every frame through the app, 8 at once."""
    app.state.serve_channel = channel_server(lambda: app, _no_direct, b"", 8, 4096, 1 << 20,
                                             idle_timeout, read_timeout, 0.005)


def _client(secret: str = "", max_answer: int = 16 << 20) -> ChannelClient:
    fallback = PeerClient(real_transport, 8, 1.0, 5.0, secret, max_answer)
    return ChannelClient(8, 1.0, 5.0, secret, max_answer, fallback=fallback)


async def test_many_calls_share_one_connection(nursery: trio.Nursery) -> None:
    _n, address = await _node(nursery, SECRET)
    client = _client(SECRET)
    client.start(nursery)
    answers: list[int] = []

    async def put_then_get(i: int) -> None:
        body = orjson.dumps({"value": f"v{i}"})
        put = await client.request(address, "PUT", f"/data/k{i}", content=body, timeout=5)
        got = await client.request(address, "GET", f"/data/k{i}", timeout=5)
        assert put.status in (200, 201) and got.json()["value"] == f"v{i}"
        answers.append(i)

    with trio.fail_after(20):
        async with trio.open_nursery() as inner:
            for i in range(50):
                inner.start_soon(put_then_get, i)
    assert sorted(answers) == list(range(50))
    assert len(client._links) == 1  # every call went over one connection
    assert client.stats.failures == {}


async def test_node_headers_count_on_an_authenticated_channel(nursery: trio.Nursery) -> None:
    """The handshake carried the secret, so a frame's node-only headers are honoured (a
    hops count at the limit refuses to forward further), and a frame's own secret header,
    right or wrong, changes nothing."""
    _n, address = await _node(nursery, SECRET)
    client = _client(SECRET)
    client.start(nursery)
    headers = {"x-kv-hops": "99", "x-kv-secret": "wrong"}
    resp = await client.request(address, "GET", "/data/k", headers=headers, timeout=5)
    assert resp.status == 400 and "X-KV-Hops" in resp.json()["error"]


async def test_a_wrong_secret_is_refused_at_the_handshake(nursery: trio.Nursery) -> None:
    _n, address = await _node(nursery, SECRET)
    client = _client("not-the-secret")
    client.start(nursery)
    with pytest.raises(PeerUnavailable) as info:
        await client.request(address, "GET", "/ping", timeout=5)
    assert info.value.status == 401 and info.value.not_sent


@pytest.mark.parametrize("hello", [b"", b"[]", b'{"secret": 7}', b"{not json"])
async def test_a_malformed_hello_is_refused_and_closed(nursery: trio.Nursery, hello: bytes) -> None:
    _n, address = await _node(nursery, SECRET)
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(PREFACE + HEAD.pack(len(hello)) + hello)
    reader = MessageReader(stream)
    with trio.fail_after(5):
        got = await reader.receive(MAX_HELLO)
        assert got is not None and orjson.loads(got[0])["status"] == 400
        assert await reader.receive(MAX_HELLO) is None


async def test_one_port_tells_the_channel_from_http_whatever_the_chunks(
    nursery: trio.Nursery,
) -> None:
    """The listener looks at the first bytes: a preface that arrives a byte at a time still
    opens a channel, and an HTTP request sent a byte at a time is still HTTP."""
    _n, address = await _node(nursery, SECRET)
    host, port = address.rsplit(":", 1)
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(host, int(port))
        for byte in PREFACE + message({"secret": SECRET}):
            await stream.send_all(bytes([byte]))
        got = await MessageReader(stream).receive(MAX_HELLO)
        assert got is not None and orjson.loads(got[0]) == {"status": 200}
        stream = await trio.open_tcp_stream(host, int(port))
        for byte in b"GET /ping HTTP/1.1\r\nhost: x\r\n\r\n":
            await stream.send_all(bytes([byte]))
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += await stream.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 200")


async def test_a_peer_without_the_channel_is_called_over_http(nursery: trio.Nursery) -> None:
    async def ping(request: Request) -> JSONResponse:
        return JSONResponse({"old": True})

    address = await _serve_http_only(nursery, Starlette(routes=[Route("/ping", ping)]))
    client = _client()
    client.start(nursery)
    for _ in range(2):  # the second call goes straight to HTTP
        resp = await client.request(address, "GET", "/ping", timeout=5)
        assert resp.status == 200 and resp.json() == {"old": True}
    assert not client._links


async def test_connection_refused_is_not_sent(nursery: trio.Nursery) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    client = _client()
    client.start(nursery)
    with pytest.raises(PeerUnavailable) as info:
        await client.request(f"127.0.0.1:{port}", "GET", "/ping", timeout=2)
    assert info.value.not_sent


async def _silent_peer(
    nursery: trio.Nursery, answer_size: int = 0, read: bool = True
) -> tuple[str, list[int]]:
    """A peer that accepts the channel, then never answers (a partition after the handshake),
    or answers every frame with ``answer_size`` bytes of body; with ``read`` false it reads
    nothing after the handshake (a node that stopped reading)."""
    connections: list[int] = []

    async def handle(stream: trio.SocketStream) -> None:
        connections.append(1)
        first = b""
        while len(first) < len(PREFACE):
            first += await stream.receive_some(len(PREFACE) - len(first))
        assert first == PREFACE
        reader = MessageReader(stream)
        assert await reader.receive(MAX_HELLO)
        await stream.send_all(message({"status": 200}))
        if not read:
            await trio.sleep_forever()
        while (got := await reader.receive(1 << 20)) is not None:
            if answer_size:
                fid = decode_request(unpack(got[0])[0], 4096)[0]
                head = orjson.dumps([fid, 200, "application/json"])
                frame = struct.pack(">I", len(head)) + head + b"x" * answer_size
                await stream.send_all(pack([frame]))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    if not read:  # a small buffer: the window closes whatever the host's TCP memory limits
        listeners[0].socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    await nursery.start(trio.serve_listeners, handle, listeners)
    port = listeners[0].socket.getsockname()[1]
    return f"127.0.0.1:{port}", connections


async def test_a_stalled_channel_times_out_and_is_replaced(nursery: trio.Nursery) -> None:
    address, connections = await _silent_peer(nursery)
    client = _client()
    client.start(nursery)
    for _ in range(2):
        with trio.fail_after(5):
            with pytest.raises(PeerUnavailable) as info:
                await client.request(address, "GET", "/ping", timeout=0.3)
        assert not info.value.not_sent  # it reached the peer: it may have been applied
    assert len(connections) == 2  # the stalled connection was dropped, not reused


async def test_a_peer_that_stops_reading_is_not_taken_for_a_partition(
    nursery: trio.Nursery,
) -> None:
    """A peer whose kernel advertises a zero window (its node reads nothing) acknowledges only
    the ever rarer window probes; the stall watcher must leave that connection alone (a
    partition is bytes with no acknowledgement while the window is open)."""
    address, _ = await _silent_peer(nursery, read=False)
    fallback = PeerClient(real_transport, 8, 1.0, 5.0, "", 16 << 20)
    client = ChannelClient(8, 1.0, 5.0, "", 16 << 20, fallback=fallback, stall_timeout=0.5)
    client.start(nursery)
    closed: list[bool] = []

    async def see_window_close() -> None:
        while not client._links:
            await trio.sleep(0.01)
        [link] = client._links.values()
        while struct.unpack_from("I", tcpinfo.tcp_info(link.stream.socket), 228)[0]:
            await trio.sleep(0.01)
        closed.append(True)

    nursery.start_soon(see_window_close)
    body = b"x" * (12 << 20)
    started = time.monotonic()
    with trio.fail_after(10), pytest.raises(PeerUnavailable) as info:
        await client.request(address, "PUT", "/x", content=body, timeout=3)
    assert closed, "the peer's window never closed: the test tested nothing"
    assert "no answer within" in str(info.value), info.value  # its timeout, not the watcher
    assert time.monotonic() - started >= 2.9  # real seconds: the kernel's probes back off


def _tcp_info(retransmits: int = 0, probes: int = 0, unacked: int = 0, last_ack_ms: int = 0,
              rtt_us: int = 100, rttvar_us: int = 50, window: int = 65535,
              unsent: int = 0) -> bytes:
    info = bytearray(232)
    info[2], info[3] = retransmits, probes
    for at, value in ((24, unacked), (56, last_ack_ms), (68, rtt_us), (72, rttvar_us),
                      (144, unsent), (228, window)):
        struct.pack_into("I", info, at, value)
    return bytes(info)


@pytest.mark.parametrize(("info", "stall"), [
    # a segment timed out and is still unacknowledged: the network dropped it
    (_tcp_info(retransmits=2, unacked=3, last_ack_ms=1500), (1.5, 0.0003)),
    # a probe that never left (a local firewall) while the window is open
    (_tcp_info(probes=1, last_ack_ms=700, rtt_us=400_000, rttvar_us=100_000), (0.7, 0.8)),
    # zero-window probes: the peer is alive and not reading
    (_tcp_info(probes=3, last_ack_ms=9000, window=0), None),
    # retransmits counted, nothing unacknowledged: not resending
    (_tcp_info(retransmits=1, last_ack_ms=5000), None),
    (_tcp_info(last_ack_ms=60_000, unacked=5), None),  # idle long, just sent: not resending
    (_tcp_info(retransmits=2, unacked=3)[:231], None),  # a kernel before 5.4: unknown
])
def test_tcp_info_says_when_the_kernel_resends_into_an_open_window(
        info: bytes, stall: tuple[float, float] | None) -> None:
    assert tcpinfo.tcp_stall(info) == (pytest.approx(stall) if stall else None)


def _link(offset: int) -> channel._Link:
    here, there = trio.socket.socketpair()
    return channel._Link("peer:1", trio.SocketStream(here),
                         MessageReader(trio.SocketStream(there)), 0.005, offset=offset)


@pytest.mark.parametrize(("info", "unsent"), [
    # the kernel is resending and never sent the last 70 bytes: frames 3-5 never left
    (_tcp_info(probes=1, last_ack_ms=3000, unsent=70), [False, True, True]),
    # an acknowledgement came (the network is back): what was queued may go out
    (_tcp_info(last_ack_ms=0, unsent=70), [False, False, True]),
    (b"", [False, False, True]),  # no TCP_INFO: only frames never handed to the socket
])
async def test_a_reset_fails_the_calls_whose_frames_never_left_as_not_sent(
        monkeypatch: pytest.MonkeyPatch, info: bytes, unsent: list[bool]) -> None:
    """Frames go out in id order, in messages; a reset fails as not sent the calls whose
    message began past what ever left this host (the kernel's ``tcpi_notsent_bytes``, read
    as the connection is reset), and those never handed to the socket."""
    link = _link(offset=100)  # the handshake took the first 100 bytes
    link._starting(2, 50)  # frames 1-2: bytes 100-149
    link._starting(3, 70)  # frames 3-5: bytes 150-219; frames 6 and on: still queued
    assert [link.never_left(f, left=150) for f in range(1, 8)] == [False] * 2 + [True] * 5
    assert [link.never_left(f, left=151) for f in range(1, 8)] == [False] * 5 + [True] * 2
    for fid in (2, 3, 6):
        link.pending[fid] = channel._Pending()
    monkeypatch.setattr(channel, "tcp_info", lambda sock: info)
    link.abort("cut", reset=True)
    assert [link.pending[f].not_sent for f in (2, 3, 6)] == unsent
    assert "cut" in link.pending[2].error


async def test_a_frame_that_cannot_be_encoded_takes_no_id(nursery: trio.Nursery) -> None:
    """A reset and a goaway count on the n-th frame queued having id n."""
    link = _link(offset=0)
    with pytest.raises(TypeError):
        await link.call("GET", "/x", {"x-bad": b"not text"}, b"")  # type: ignore[dict-item]
    nursery.start_soon(link.call, "GET", "/x", {}, b"")
    await trio.testing.wait_all_tasks_blocked()
    assert list(link.pending) == [1]


async def test_a_caller_that_gives_up_leaves_the_connection_to_the_others(
    nursery: trio.Nursery,
) -> None:
    """Only a call's own timeout says the connection may be dead: a caller cancelled from
    outside (its client went away) must not take the other calls' connection down."""
    address, connections = await _silent_peer(nursery)
    client = _client()
    client.start(nursery)
    with trio.move_on_after(0.2):
        await client.request(address, "GET", "/ping", timeout=5)
    [link] = client._links.values()
    assert not link.closed
    with trio.fail_after(5), pytest.raises(PeerUnavailable):
        await client.request(address, "GET", "/ping", timeout=0.3)
    assert link.closed and len(connections) == 1


async def test_an_answer_over_the_limit_is_refused_as_too_large(nursery: trio.Nursery) -> None:
    address, _ = await _silent_peer(nursery, answer_size=200_000)
    client = _client(max_answer=100_000)
    client.start(nursery)
    with pytest.raises(PeerUnavailable) as info:
        await client.request(address, "GET", "/ping", timeout=5)
    assert info.value.too_large


async def _raw_channel(address: str, secret: str) -> tuple[trio.SocketStream, MessageReader]:
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(PREFACE + message({"secret": secret}))
    reader = MessageReader(stream)
    got = await reader.receive(MAX_HELLO)
    assert got is not None and orjson.loads(got[0]) == {"status": 200}
    return stream, reader


async def _answers(reader: MessageReader, n: int) -> list[object]:
    out: list[object] = []
    with trio.fail_after(5):
        while len(out) < n:
            got = await reader.receive(1 << 20)
            if got is None:
                out.append("eof")
                break
            out.extend(decode_answer(f, 4096) for f in unpack(got[0]))
    return out


@pytest.mark.parametrize("frame", [
    encode_request(7, "BREW", "/ping", {}, b""),
    encode_request(7, "GET", "ping", {}, b""),
    encode_request(7, "GET", "/ping", {"bad name": "x"}, b""),
    struct.pack(">I", 13) + b'[7,"GET","/"]',
    encode_request(7, "PUT", "/data/k", {}, b"{not json"),
    encode_request(7, "POST", "/internal/sync", {}, b'{"sender": "x"}'),
])
async def test_bad_frames_get_400_and_change_nothing(nursery: trio.Nursery, frame: bytes) -> None:
    node, address = await _node(nursery, SECRET)
    stream, reader = await _raw_channel(address, SECRET)
    await stream.send_all(pack([frame]))
    [(fid, status, _ctype, body)] = await _answers(reader, 1)  # type: ignore[misc]
    assert (fid, status) == (7, 400) and "error" in orjson.loads(body)
    assert len(node.replica.store) == 0 and node.task_failures == 0


def _message(body: bytes) -> bytes:
    return HEAD.pack(len(body)) + body


@pytest.mark.parametrize("data", [
    _message(b"\x00"),  # shorter than a frame's length
    _message(struct.pack(">I", 1 << 30) + b"[]"),  # a frame past the message's end
    pack([struct.pack(">I", 1 << 30) + b"[]"]),  # a head past the frame's end
    pack([struct.pack(">I", 2) + b"{}"]),  # a head that is no list
    pack([b""] * (MAX_FRAMES + 1)),  # too many frames in one message
    HEAD.pack(1 << 30) + b"x" * 100,  # a message over the limit: never buffered
    b"GET /ping HTTP/1.1\r\n\r\n",  # HTTP inside the channel
])
async def test_unreadable_frames_close_the_channel_not_the_node(
    nursery: trio.Nursery, data: bytes
) -> None:
    node, address = await _node(nursery, SECRET)
    stream, reader = await _raw_channel(address, SECRET)
    await stream.send_all(data)
    assert await _answers(reader, 1) == ["eof"]
    client = _client(SECRET)
    client.start(nursery)
    assert (await client.request(address, "GET", "/ping", timeout=5)).status == 200
    assert node.task_failures == 0


async def test_direct_frames_are_bounded_counted_and_checked_like_http(
    nursery: trio.Nursery,
) -> None:
    """Data and peer-message frames skip the ASGI stack; they must still be bounded by the
    same request limit, counted in /metrics' request stats, and refuse a bad request id."""
    node, address = await _node(nursery, SECRET)
    client = _client(SECRET)
    client.start(nursery)
    big = orjson.dumps({"value": "x" * (node.config.max_request_bytes + 10)})
    resp = await client.request(address, "PUT", "/data/k", content=big, timeout=10)
    assert resp.status == 413
    resp = await client.request(address, "GET", "/data/k", headers={"x-request-id": "a b"},
                                timeout=5)
    assert resp.status == 400 and "X-Request-Id" in resp.json()["error"]
    resp = await client.request(address, "PUT", "/data/k", content=b'{"value": "v"}',
                                headers={"x-request-id": "trace-1"}, timeout=5)
    assert resp.status in (200, 201)
    assert (await client.request(address, "GET", "/data", timeout=5)).status == 200  # via app
    assert len(node.replica.store) == 1
    resp = await client.request(address, "GET", "/metrics", timeout=5)
    text = resp.body.decode()
    assert 'method="PUT",route="/data/{key}",status="413"} 1.0' in text
    assert 'method="GET",route="/data/{key}",status="400"} 1.0' in text
    assert 'method="PUT",route="/data/{key}",status="200"} 1.0' in text


async def test_calls_queued_during_a_send_share_the_next_message() -> None:
    """No timer: the first frame goes at once; those queued while it is sent go together."""
    sent: list[list[bytes]] = []
    release = trio.Event()

    async def send(message: bytes) -> None:
        sent.append(unpack(message[HEAD.size :]))
        if len(sent) == 1:
            await release.wait()

    outbox = Outbox(send)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        outbox.put(b"frame0")
        await trio.testing.wait_all_tasks_blocked()  # the writer is sending frame0
        for i in range(1, 10):
            outbox.put(b"frame%d" % i)
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        outbox.close()
    assert sent == [[b"frame0"], [b"frame%d" % i for i in range(1, 10)]]


async def test_frames_wait_until_the_node_goes_idle_then_go_out_in_one_write() -> None:
    """Frames are held while this node still has tasks to run (up to the linger), then
    written together without the writer; bytes the socket did not take are the writer's,
    sent before anything queued after them; ``sent`` hears of each frame once, when all of
    it is written."""
    writes: list[bytes] = []  # what each immediate write took
    takes: list[int] = []  # bytes the next immediate writes take (-1: would block; else all)
    by_writer: list[bytes] = []
    done: list[bytes] = []

    def try_send(data: bytes) -> int:
        take = takes.pop(0) if takes else len(data)
        if take < 0:
            raise BlockingIOError
        writes.append(data[:take])
        return take

    async def send(data: bytes) -> None:
        by_writer.append(data)

    def sent(frames: list[bytes]) -> bool:
        done.extend(frames)
        return False

    async def go_idle() -> None:
        await trio.sleep(0.001)  # every task blocked: the loop waits for I/O, and flushes

    outbox = Outbox(send, sent, try_send, linger=60)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        await trio.testing.wait_all_tasks_blocked()  # the writer waits
        outbox.put(b"a")
        outbox.put(b"b")
        for _ in range(10):
            await trio.sleep(0)  # still runnable: the loop is busy, the frames wait
        assert writes == [] and done == []
        await go_idle()
        assert writes == [pack([b"a", b"b"])] and done == [b"a", b"b"] and by_writer == []
        takes.append(3)
        outbox.put(b"partly")  # 3 bytes taken; the rest is the writer's
        await go_idle()
        outbox.put(b"after")  # after the rest
        takes.append(-1)  # and the socket takes none of it: the writer sends it
        await go_idle()
        outbox.close()
    assert done == [b"a", b"b", b"partly", b"after"]
    assert b"".join(writes[1:]) + b"".join(by_writer) == pack([b"partly"]) + pack([b"after"])


async def test_a_busy_node_sends_within_its_linger() -> None:
    """A node that never goes idle still sends each frame once its linger is over."""
    writes: list[bytes] = []

    def try_send(data: bytes) -> int:
        writes.append(data)
        return len(data)

    async def send(data: bytes) -> None:
        raise AssertionError("the idle flush sends these")

    outbox = Outbox(send, None, try_send, linger=0.01)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        await trio.testing.wait_all_tasks_blocked()
        started = time.perf_counter()
        outbox.put(b"frame")
        while not writes:
            await trio.sleep(0)  # busy: always runnable
        assert time.perf_counter() - started >= 0.01
        outbox.close()
    assert writes == [pack([b"frame"])]


async def test_a_flush_that_fails_closes_that_connection_through_its_writer() -> None:
    """A bug while flushing (not a socket error) is logged; the writer raises it to the
    connection's owner, which closes the connection, and later frames still flush."""
    def broken(data: bytes) -> int:
        raise ValueError("a bug")

    async def send(data: bytes) -> None:
        raise AssertionError("nothing reaches the writer's send")

    outbox = Outbox(send, None, broken, linger=60)
    raised: list[BaseException] = []

    async def writer() -> None:
        try:
            await outbox.run()
        except trio.BrokenResourceError as exc:
            raised.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        outbox.put(b"frame")
        await trio.sleep(0.001)  # idle: the flush runs, fails, and the writer raises
    assert outbox.closed and len(raised) == 1
    written: list[bytes] = []
    healthy = Outbox(send, None, lambda data: written.append(data) or len(data), linger=60)
    healthy.put(b"later")
    await trio.sleep(0.001)
    assert written == [pack([b"later"])]  # the flush itself goes on


async def test_a_call_already_out_of_time_sends_nothing_and_spares_the_connection(
    nursery: trio.Nursery,
) -> None:
    """A call whose timeout is over before it starts fails alone: nothing is sent, and calls
    in flight on the same connection are answered."""
    address, started, release, _ = await _slow_server(nursery)
    client = _client()
    client.start(nursery)
    answers: list[int] = []

    async def in_flight() -> None:
        answers.append((await client.request(address, "GET", "/slow", timeout=10)).status)

    nursery.start_soon(in_flight)
    await started.wait()
    with pytest.raises(PeerUnavailable):
        await client.request(address, "GET", "/slow", timeout=0)
    release.set()
    with trio.fail_after(5):
        while not answers:
            await trio.sleep(0.01)
    assert answers == [200] and len(client._links) == 1


async def test_an_unhandled_error_is_a_500_answer_and_the_channel_goes_on(
    nursery: trio.Nursery,
) -> None:
    """Starlette re-raises an unhandled error after answering 500; over the channel the
    answer is sent and the connection keeps serving."""
    async def boom(request: Request) -> JSONResponse:
        raise ValueError("a bug")

    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/boom", boom), Route("/ok", ok)])
    _with_channel(app)
    address = await _serve(nursery, app)
    client = _client()
    client.start(nursery)
    assert (await client.request(address, "GET", "/boom", timeout=5)).status == 500
    assert (await client.request(address, "GET", "/ok", timeout=5)).json() == {"ok": True}
    assert len(client._links) == 1 and client.stats.failures == {}


async def test_silent_connections_are_closed(nursery: trio.Nursery) -> None:
    """A connection that says nothing closes after keep_alive_timeout (as HTTP's idle ones do);
    a channel that goes silent, after the channel's idle timeout."""
    app = Starlette(routes=[])
    _with_channel(app, idle_timeout=0.5, read_timeout=0.5)
    cfg = _hyper_config()
    cfg.keep_alive_timeout = 0.2
    binds = await nursery.start(partial(
        listener.serve, app, cfg, app.state.serve_channel, shutdown_trigger=trio.sleep_forever))
    host, port = str(binds[0]).removeprefix("http://").rsplit(":", 1)
    with trio.fail_after(5):
        silent = await trio.open_tcp_stream(host, int(port))
        assert await silent.receive_some(10) == b""
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(PREFACE + message({"secret": ""}))
        reader = MessageReader(stream)
        assert await reader.receive(MAX_HELLO) is not None  # welcome
        assert await reader.receive(1 << 20) is None  # then closed for silence
        # a message that trickles in, a byte at a time, is closed as soon
        trickle = await trio.open_tcp_stream(host, int(port))
        await trickle.send_all(PREFACE + message({"secret": ""}))
        reader = MessageReader(trickle)
        assert await reader.receive(MAX_HELLO) is not None
        started = trio.current_time()
        with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
            for byte in HEAD.pack(1000) + b"x" * 1000:
                await trickle.send_all(bytes([byte]))
                await trio.sleep(0.1)
        assert 0.5 <= trio.current_time() - started < 2


async def _slow_server(nursery: trio.Nursery) -> tuple[str, trio.Event, trio.Event, trio.Event]:
    """A server whose ``/slow`` answers once ``release`` is set (``started``: it is running);
    ``stop`` shuts the server down."""
    release, started, stop = trio.Event(), trio.Event(), trio.Event()

    async def slow(request: Request) -> JSONResponse:
        started.set()
        await release.wait()
        return JSONResponse({"done": True})

    app = Starlette(routes=[Route("/slow", slow)])
    _with_channel(app)
    binds = await nursery.start(partial(
        listener.serve, app, _hyper_config(), app.state.serve_channel, shutdown_trigger=stop.wait))
    return str(binds[0]).removeprefix("http://"), started, release, stop


async def test_calls_in_flight_are_answered_when_the_node_shuts_down(
    nursery: trio.Nursery,
) -> None:
    """Shutting down stops reading new frames; a call already running still gets its answer
    before the channel closes (HTTP requests in flight get the same grace)."""
    address, started, release, stop = await _slow_server(nursery)
    stream, reader = await _raw_channel(address, "")
    await stream.send_all(pack([encode_request(1, "GET", "/slow", {}, b"")]))
    with trio.fail_after(5):
        await started.wait()
        stop.set()
        await trio.testing.wait_all_tasks_blocked()
        # the goaway: frame 1 was read, any later one will not be served
        [(fid, status, ctype, body)] = await _answers(reader, 1)  # type: ignore[misc]
        assert (fid, status, ctype, orjson.loads(body)) == (0, 503, "goaway", {"frames_read": 1})
        await stream.send_all(pack([encode_request(2, "GET", "/slow", {}, b"")]))
        release.set()
        [(fid, status, _ctype, body)] = await _answers(reader, 1)  # type: ignore[misc]
        assert (fid, status, orjson.loads(body)) == (1, 200, {"done": True})
        assert await _answers(reader, 1) == ["eof"]  # frame 2 never served
        await stream.aclose()


async def test_a_call_after_the_goaway_is_not_sent(nursery: trio.Nursery) -> None:
    """A client told the owner is stopping fails its later calls as not sent (so they may go
    to another replica), while the call in flight still gets its answer."""
    address, started, release, stop = await _slow_server(nursery)
    client = _client()
    client.start(nursery)
    answers: list[int] = []

    async def first() -> None:
        answers.append((await client.request(address, "GET", "/slow", timeout=5)).status)

    with trio.fail_after(5):
        nursery.start_soon(first)
        await started.wait()
        stop.set()
        while not client._links[address].going_away:
            await trio.sleep(0.01)
        with pytest.raises(PeerUnavailable) as info:
            await client.request(address, "GET", "/slow", timeout=2)
        assert info.value.not_sent
        release.set()
        while not answers:
            await trio.sleep(0.01)
    assert answers == [200]


async def test_a_peer_that_does_not_read_gets_no_more_answers_queued(
    nursery: trio.Nursery,
) -> None:
    """Answers not yet written hold their call's slot: a peer that sends calls and never
    reads is served at most channel_max_in_flight of them (plus what the sockets' buffers
    take), not one answer per call kept in memory."""
    node = Node(Config(node_id=1, host="127.0.0.1", channel_max_in_flight=4))
    await nursery.start(node.run)
    address = await _serve(nursery, build_app(node))
    view = parse_view({"view": {"s1": [{"id": 1, "address": address}]}})
    assert await node.put_view(view) is None
    big = "x" * 900_000
    assert (await node.data("PUT", "big", {}, big)).status in (200, 201)
    host, port = address.rsplit(":", 1)
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect((host, int(port)))
    stream = trio.SocketStream(sock)
    await stream.send_all(PREFACE + message({"secret": ""}))
    await stream.receive_some(len(message({"status": 200})))
    frames = [encode_request(i, "GET", "/data/big", {}, b"") for i in range(1, 201)]
    await stream.send_all(pack(frames))

    async def served() -> int:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://{address}/metrics")).text
        line = next((ln for ln in text.splitlines() if ln.startswith("trio_kv_http_requests_total")
                     and 'route="/data/{key}",status="200"' in ln), None)
        return 0 if line is None else int(float(line.rsplit(" ", 1)[1]))

    with trio.fail_after(20):
        count, steady_since = -1, trio.current_time()
        while trio.current_time() - steady_since < 1.0:  # until it stops growing
            now = await served()
            if now != count:
                count, steady_since = now, trio.current_time()
            await trio.sleep(0.1)
    assert 4 <= count <= 4 + 12, f"{count} answers made for a peer that reads none"
    await stream.aclose()


async def test_a_silent_connection_does_not_hold_up_shutdown(nursery: trio.Nursery) -> None:
    """A connection that has sent nothing yet (a health check, a port scan) closes when the
    node stops, as hypercorn closes its idle ones, not after keep_alive_timeout."""
    app = Starlette(routes=[])
    _with_channel(app, idle_timeout=30, read_timeout=30)
    cfg = _hyper_config()
    cfg.keep_alive_timeout, cfg.graceful_timeout = 30, 30
    stop, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        await listener.serve(app, cfg, app.state.serve_channel, shutdown_trigger=stop.wait,
                             task_status=task_status)
        stopped.set()

    binds = await nursery.start(run)
    host, port = str(binds[0]).removeprefix("http://").rsplit(":", 1)
    silent = await trio.open_tcp_stream(host, int(port))
    half = await trio.open_tcp_stream(host, int(port))
    await half.send_all(PREFACE)  # a channel still to say hello
    await trio.testing.wait_all_tasks_blocked(0.05)  # both accepted and waiting
    with trio.fail_after(2):
        stop.set()
        await stopped.wait()
        assert await silent.receive_some(10) == b""
    await silent.aclose()
    await half.aclose()
