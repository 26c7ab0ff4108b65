"""MEW2, the broker-worker protocol: credit-based flow with heartbeats.

Between a worker's DEALER socket and the broker's backend ROUTER, every
message starts with one header frame, ASCII words separated by spaces::

    worker -> broker
      "MEW2 READY W"            I hold nothing and may hold up to W requests
                                (1 <= W <= 1024): sent on every (re)connection
      "MEW2 HB W"               heartbeat, with the window again: a broker that
                                does not know the worker (it restarted) takes
                                it into its pool with that window
      "MEW2 REP " + ID, FRAMES  the answer to request ID: its frames, echoed
      "MEW2 BYE"                I am leaving (graceful stop): send me nothing more
    broker -> worker
      "MEW2 REQ " + ID, FRAMES  echo FRAMES; ID is 16 random bytes drawn for
                                this request alone (os.urandom): one request
                                tells nothing about another
      "MEW2 HB"                 heartbeat: the broker is alive

Credit: the broker keeps at most W requests in flight with a worker; each
REP gives one credit back. A new request goes to the worker with the fewest
in flight (least recently used among equals). A reply counts only when it
comes from the worker the broker sent that request to, for a request still
unanswered; anything else is dropped and counted (``late``).

Deadlines (``--request-timeout``, ``--hold-timeout``): a worker that holds
a request longer than the hold timeout loses it (it goes to another worker)
and leaves the pool, heartbeats or not. A request that cannot be served
(not answered within the request timeout of the broker reading it, or held
by ``MAX_TRIES`` workers that died or lost it) gets the error reply below.

Liveness: each side sends HB every ``interval`` seconds (``--heartbeat``)
and takes any message from the other as a sign of life. A worker silent for
``liveness`` intervals leaves the pool; its requests go to other workers. A
worker that hears nothing from the broker for as long listens one interval
more, then opens a fresh socket with a new identity and says READY (after a
backoff): a restarted broker finds it again. A worker that crashes closes
its connection: the broker's backend monitor sees it and heartbeats every
worker at once and again a few milliseconds later; the send to the dead
one fails (ROUTER_MANDATORY), so its requests move within milliseconds.

A worker that says READY while it holds requests has broken the protocol
(or restarted under the same identity): it leaves the pool, its identity is
not taken back, its requests go elsewhere. A peer speaking MEW1 (an older
myecho worker) is refused: one log line, nothing sent back.

The error reply: a client's request that cannot be served is answered with
its envelope (its frames up to and including the first empty frame: for a
REQ client, the empty delimiter) followed by three frames::

    "MYECHO-ERROR", REASON, TEXT

REASON is one ASCII word (``timeout``, ``tries``, ``too-big``, ``busy``,
``stopping``: the broker stopped before an answer came), TEXT one line for
humans. An echo is the request itself; a request whose
body is exactly such three frames gets a fourth, empty, frame in its error
reply, so an error never equals its request.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL = b"MEW2"
OLD_PROTOCOL = b"MEW1"
READY = b"MEW2 READY "
HEARTBEAT = b"MEW2 HB"
REQUEST = b"MEW2 REQ "
REPLY = b"MEW2 REP "
BYE = b"MEW2 BYE"
ID_SIZE = 16
MAX_WINDOW = 1024

ERROR = b"MYECHO-ERROR"

#: A request that this many workers died holding (or lost by the hold
#: timeout) gets the error reply: a poison request must not take the pool down.
MAX_TRIES = 3
#: How much longer than a client's message a worker's message may be.
ENVELOPE = 1024


@dataclass(frozen=True)
class Timing:
    """Heartbeat interval and how many of them may be missed."""

    interval: float = 1.0
    liveness: int = 3

    @property
    def patience(self) -> float:
        """Silence after which a peer is taken for dead."""
        return self.interval * self.liveness

    def backoff(self, attempt: int) -> float:
        """Pause before a worker's ``attempt``-th reconnection (0, 1, ...)."""
        return self.interval * min(1 << min(attempt, 3), 8)


def window_of(header: bytes) -> int | None:
    """The window of a READY or HB header (``MEW2 READY 16``), None if malformed."""
    words = header.split(b" ")
    if len(words) != 3 or not words[2].isdigit() or len(words[2]) > 4:
        return None
    window = int(words[2])
    return window if 1 <= window <= MAX_WINDOW else None


def envelope(frames: list[bytes]) -> list[bytes]:
    """A client message's envelope: its frames up to the first empty one, included."""
    for number, frame in enumerate(frames):
        if not frame:
            return frames[: number + 1]
    return []


def error_reply(frames: list[bytes], reason: bytes, text: str) -> list[bytes]:
    """The error reply to a request (see the module's docstring)."""
    head = envelope(frames)
    reply = [*head, ERROR, reason, text.encode()]
    if reply == frames:
        reply.append(b"")
    return reply
