"""MEW1, the broker-worker protocol: a paranoid-pirate-like dialogue of our own.

Between a worker's DEALER socket and the broker's backend ROUTER, every
message starts with the protocol frame ``MEW1`` and a command frame::

    worker -> broker
      MEW1 READY               I am free: sent on every (re)connection
      MEW1 HB                  heartbeat: I am alive
      MEW1 REP ID FRAMES...    the answer to request ID: the client's frames, echoed
      MEW1 BYE                 I am leaving (graceful stop): send me nothing more
    broker -> worker
      MEW1 REQ ID FRAMES...    echo FRAMES; ID is 16 bytes (a random nonce per
                               broker run, then a counter)
      MEW1 HB                  heartbeat: the broker is alive

Timing: each side sends HB every ``interval`` seconds (``--heartbeat``,
1 s by default) and takes *any* message from the other as a sign of life.
A peer silent for ``liveness`` intervals (``--liveness``, 3) is dead:

- the broker drops the worker from its pool, and the request it held goes
  back to the head of the queue, for the next free worker;
- the worker listens for one more interval (the silence may be its own: a
  worker woken from SIGSTOP answers what it holds, late), then closes its
  socket, waits (one interval, doubling up to eight), opens a fresh one
  with a new identity and says READY: a restarted broker is found again. libzmq's own reconnection is usually faster: a
  broker back on the same endpoint gets the worker's next HB, and a HB
  from a worker it does not know registers it as free. That is sound
  because a worker holds at most one request and only speaks when it
  holds none (it answers before it speaks again).

A worker that crashes closes its connections: the broker's backend monitor
sees the disconnection and heartbeats every worker at once, and again 5, 20
and 100 ms later (libzmq drops the pipe a few hops after it reports the
event); with ROUTER_MANDATORY the send to the dead one fails (EHOSTUNREACH,
or EAGAIN while its pipe closes), so it leaves the pool within milliseconds
and its request goes to another worker. Only a hung worker (or a host gone
without a FIN) costs ``liveness × interval``.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL = b"MEW1"
READY = b"READY"
HEARTBEAT = b"HB"
REQUEST = b"REQ"
REPLY = b"REP"
BYE = b"BYE"
COMMANDS = frozenset({READY, HEARTBEAT, REQUEST, REPLY, BYE})

#: A request that this many workers died holding is given up (logged and
#: counted): a poison request must not take the whole pool down.
MAX_TRIES = 5
#: How much longer than the clients' MAX_MESSAGE a worker message may be.
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


def parse(frames: list[bytes]) -> tuple[bytes, list[bytes]] | None:
    """``(command, rest)`` of a MEW1 message, or None if it is not one."""
    if len(frames) < 2 or frames[0] != PROTOCOL or frames[1] not in COMMANDS:
        return None
    return frames[1], frames[2:]
