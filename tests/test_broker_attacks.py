"""The broker against misbehaving peers, over real sockets: DEALERs that speak MEW2 by hand.

Without CURVE a plain peer on the backend is a worker by design; what must
hold anyway: a reply counts only from the worker that holds the request, an
identity cannot be taken over, a worker cannot hold requests for ever, a
request is answered or gets the error reply, and memory stays bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import test_broker
import zmq
from support import req, wait_status
from test_broker import Pool, dealer

from myecho.models import mew

Context = zmq.Context[zmq.Socket[bytes]]
pool = test_broker.pool  # the fixture, shared (context comes from conftest.py)
SLOW_BEATS = ["--heartbeat", "5"]  # fakes send no heartbeats: silence must not be what drops them


class Fake:
    """A worker by hand: READY with a window, then whatever the test does."""

    def __init__(self, ctx: Context, backend: str, window: int = 16, identity: bytes = b"") -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity:
            self.sock.setsockopt(zmq.ROUTING_ID, identity)
        self.sock.connect(backend)
        self.sock.send(mew.READY + str(window).encode())

    def request(self, timeout: float = 5.0) -> list[bytes] | None:
        """The next REQ (HBs skipped), or None if none came in time."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000)):
                return None
            frames = self.sock.recv_multipart()
            if frames[0].startswith(mew.REQUEST):
                return frames
        return None

    def answer(self, frames: list[bytes], body: list[bytes] | None = None) -> None:
        self.sock.send_multipart([mew.REPLY + frames[0][len(mew.REQUEST) :], *(body or frames[1:])])


def error_of(frames: list[bytes]) -> bytes:
    """The reason word of an error reply from a REQ client's view."""
    assert frames[0] == mew.ERROR and len(frames) == 3, frames
    return frames[1]


def test_a_forged_reply_for_a_held_request_is_ignored(pool: Callable[..., Pool], context: Context) -> None:
    p = pool(0, beats=SLOW_BEATS)
    honest = Fake(context, p.backend)
    p.workers(1)
    client = req(context, p.url)
    client.send(b"for the honest one")
    held = honest.request()
    assert held is not None and held[1:] == [b"", b"for the honest one"]
    rogue = Fake(context, p.backend)
    p.workers(2)
    rogue.answer(held, [b"", b"forged"])  # even knowing the ID: not the worker that holds it
    assert not client.poll(300)
    honest.answer(held)
    assert client.poll(5000) and client.recv() == b"for the honest one"
    assert "1 late replies dropped" in wait_status(p.broker, "late")
    # IDs are random per request: one tells nothing about the next.
    client.send(b"next")
    following = honest.request(1) or rogue.request(1)
    assert following is not None
    next_id, first_id = following[0][len(mew.REQUEST) :], held[0][len(mew.REQUEST) :]
    assert len(next_id) == len(first_id) == mew.ID_SIZE and next_id[:8] != first_id[:8]


def test_an_identity_cannot_be_taken_over(pool: Callable[..., Pool], context: Context) -> None:
    p = pool(0, beats=SLOW_BEATS)
    honest = Fake(context, p.backend, identity=b"host/1234/0")
    p.workers(1)
    rogue = Fake(context, p.backend, identity=b"host/1234/0")  # libzmq refuses the second connection
    time.sleep(0.2)
    client = dealer(context, p.url)
    for number in range(20):
        client.send_multipart([b"", b"%d" % number])
    got = []
    while len(got) < 20 and (frames := honest.request(2)) is not None:
        got.append(frames)
        honest.answer(frames)
    assert len(got) == 20
    assert rogue.request(0.3) is None  # not one stolen
    client.setsockopt(zmq.RCVTIMEO, 5000)
    assert [client.recv_multipart()[1] for _ in range(20)] == [b"%d" % n for n in range(20)]


def test_a_hung_worker_loses_its_requests_by_the_hold_timeout(pool: Callable[..., Pool], context: Context) -> None:
    p = pool(0, beats=SLOW_BEATS, extra=("--hold-timeout", "0.5"))
    hung = Fake(context, p.backend, window=4)  # it will take requests and say nothing, not even HB
    p.workers(1)
    client = dealer(context, p.url)
    sent = time.monotonic()
    for number in range(3):
        client.send_multipart([b"", b"held %d" % number])
    taken = [hung.request() for _ in range(3)]
    assert all(taken)
    p.worker()
    client.setsockopt(zmq.RCVTIMEO, 5000)
    assert [client.recv_multipart() for _ in range(3)] == [[b"", b"held %d" % n] for n in range(3)]
    assert 0.4 < time.monotonic() - sent < 3
    status = wait_status(p.broker, "hold timeout")
    assert "1 workers over the hold timeout" in status and "3 retried" in status
    for frames in taken:  # its answers now come too late; its identity is not taken back
        assert frames is not None
        hung.answer(frames)
    hung.sock.send(mew.HEARTBEAT + b" 4")
    status = wait_status(p.broker, "3 late")
    assert "; 1 worker (" in status


def test_a_worker_that_says_ready_on_every_request(pool: Callable[..., Pool], context: Context) -> None:
    """It cannot keep a request: refused after the first; with no honest worker the client gets an error."""
    p = pool(0, beats=SLOW_BEATS)
    amnesic = Fake(context, p.backend)
    p.workers(1)
    client = req(context, p.url)
    client.send(b"take it")
    held = amnesic.request()
    assert held is not None
    amnesic.sock.send(mew.READY + b"16")
    assert "1 workers refused" in wait_status(p.broker, "refused")
    assert amnesic.request(0.3) is None  # refused for good: nothing more for it
    p.worker()
    assert client.poll(5000) and client.recv() == b"take it"

    # Only such workers: each takes the request once, then the client hears why it failed.
    lonely = pool(0, beats=SLOW_BEATS)
    asker = req(context, lonely.url)
    asker.send(b"anyone honest?")
    for number in range(mew.MAX_TRIES):
        rogue = Fake(context, lonely.backend, identity=b"rogue %d" % number)
        assert rogue.request() is not None
        rogue.sock.send(mew.READY + b"16")
    assert asker.poll(5000)
    assert error_of(asker.recv_multipart()) == b"tries"


def test_no_worker_in_time_gets_the_error_reply(pool: Callable[..., Pool], context: Context) -> None:
    p = pool(0, extra=("--request-timeout", "0.5"))
    client = req(context, p.url)
    sent = time.monotonic()
    client.send_multipart([b"nobody", b"home"])
    assert client.poll(5000)
    reply = client.recv_multipart()
    assert 0.45 < time.monotonic() - sent < 2
    assert error_of(reply) == b"timeout" and b"0.5 s" in reply[2]
    assert "1 timed out" in wait_status(p.broker, "timed out")


def test_a_huge_multipart_message(pool: Callable[..., Pool], context: Context) -> None:
    """Eight frames of 900 KiB with a 1 MiB limit: an error reply, nothing sent on; the client goes on."""
    p = pool(1, extra=("--max-message", str(1 << 20), "--client-bytes", str(2 << 20)))
    client = req(context, p.url)
    client.send_multipart([b"\x00" * (900 << 10)] * 8)
    assert client.poll(5000)
    assert error_of(client.recv_multipart()) == b"too-big"
    assert "1 too big" in wait_status(p.broker, "too big")
    client.send(b"x" * (1 << 19))
    assert client.poll(5000) and client.recv() == b"x" * (1 << 19)
    # One frame over the limit: libzmq closes that connection; the others go on.
    brute = req(context, p.url)
    brute.send(b"\x00" * (2 << 20))
    assert not brute.poll(300)
    client.send(b"still")
    assert client.poll(5000) and client.recv() == b"still"


def test_a_client_whose_replies_pile_up_stays_bounded(pool: Callable[..., Pool], context: Context) -> None:
    """Its first request held by a hung worker, its next ones answered: the broker keeps at most
    --client-bytes for it and refuses the rest with errors; another client is served meanwhile."""
    limit = 1 << 20
    p = pool(
        0,
        beats=SLOW_BEATS,
        extra=("--client-bytes", str(limit), "--max-message", str(256 << 10), "--hold-timeout", "2"),
    )
    hung = Fake(context, p.backend, window=1)
    p.workers(1)
    greedy = dealer(context, p.url)
    greedy.send_multipart([b"", b"first"])
    assert hung.request() is not None
    p.worker()
    p.workers(2)
    body = b"y" * (100 << 10)
    for number in range(40):  # 4 MiB
        greedy.send_multipart([b"", b"%02d" % number + body])
    status = wait_status(p.broker, "over a byte limit")
    held = int(status.split(" in the broker (")[1].split(" bytes")[0])
    assert held <= limit, status
    other = req(context, p.url)
    other.send(b"not my problem")
    assert other.poll(5000) and other.recv() == b"not my problem"
    # The hold timeout frees the first; then everything comes, in order: echoes, then errors.
    greedy.setsockopt(zmq.RCVTIMEO, 10_000)
    assert greedy.recv_multipart() == [b"", b"first"]
    replies = [greedy.recv_multipart() for _ in range(40)]
    echoes = [r for r in replies if r[1] != mew.ERROR]
    assert echoes == [[b"", b"%02d" % n + body] for n in range(len(echoes))]
    assert 5 <= len(echoes) <= 10  # 1 MiB of 100 KiB requests
    assert all(r[1:3] == [mew.ERROR, b"busy"] for r in replies[len(echoes) :])
    assert "0 bytes" in wait_status(p.broker, "(0 bytes)")


def test_a_mew1_worker_is_refused_with_a_clear_line(pool: Callable[..., Pool], context: Context) -> None:
    p = pool(0, beats=SLOW_BEATS)
    old = dealer(context, p.backend)
    old.send_multipart([mew.OLD_PROTOCOL, b"READY"])
    status = wait_status(p.broker, "refused")
    assert "; 0 workers (" in status and "1 workers refused" in status
    assert "speaks MEW1 (an older myecho); upgrade it" in p.broker.stderr
    client = req(context, p.url)
    client.send(b"not for it")
    assert not old.poll(300)


def test_the_window_and_least_loaded_first(pool: Callable[..., Pool], context: Context) -> None:
    """Each fake may hold 3: six requests go three and three; the seventh waits for a reply."""
    p = pool(0, beats=SLOW_BEATS)
    first, second = Fake(context, p.backend, window=3), Fake(context, p.backend, window=3)
    p.workers(2)
    client = dealer(context, p.url)
    for number in range(7):
        client.send_multipart([b"", b"%d" % number])
    one = [first.request(1) for _ in range(3)]
    two = [second.request(1) for _ in range(3)]
    assert all(one) and all(two)
    assert first.request(0.3) is None and second.request(0.1) is None
    assert one[0] is not None
    first.answer(one[0])
    seventh = first.request()
    assert seventh is not None and seventh[1:] == [b"", b"6"]


def test_a_stopping_broker_tells_the_clients_it_could_not_serve(pool: Callable[..., Pool], context: Context) -> None:
    p = pool(0, extra=("--graceful-timeout", "0.5"))
    client = req(context, p.url)
    client.send(b"too late")
    time.sleep(0.3)  # read by the broker, no worker to take it
    assert p.broker.stop() == 0
    assert client.poll(5000)
    assert error_of(client.recv_multipart()) == b"stopping"
