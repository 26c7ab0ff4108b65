"""The asyncio model: the talk's last word ("libevent, eio, ..."), today.

An event library runs the loop and calls us back: an ``asyncio.Protocol``
per connection, on uvloop's loop (libuv, the C event library behind
Node.js) when it is installed, else on asyncio's own. What sits around it
is the shared layer the select model has:
- listening sockets from myecho.core.sockets (systemd's, or bound), accepted
  here in bounded batches so that ``max_connections`` and running out of
  file descriptors can stop accepting for a while (connections wait in the
  kernel's backlog; the loop does not spin on EMFILE);
- backpressure: a transport holding more than ``buffer_limit`` bytes for
  a client that does not read pauses that client's reads;
- signals through the runtime's fd, graceful stop, SIGHUP reload,
  READY/STATUS/WATCHDOG from a timer of the loop;
- idle connections closed after ``idle_timeout``, and at the limit, with
  connections waiting in the backlog, the idlest shed first (an idle
  flood cannot keep a new client out), as in the select model.

Idle times come from a coarse clock, set by each housekeeping round, so
that an echo costs no clock read: a connection's ``seen`` is the time it
was made, then the clock of the round before its last activity.
"""

from __future__ import annotations

import asyncio
import heapq
import importlib
import logging
import socket
from collections.abc import Callable
from operator import attrgetter
from typing import Any, cast

from myecho.core.accepting import (
    PAUSE,
    PRESSURE_POLL,
    Acceptor,
    Pressure,
    connection_ended,
    idle_reason,
    shed_reason,
    waiting,
)
from myecho.core.runtime import Runtime
from myecho.core.sockets import Listeners, describe, raise_fd_limit

LISTENERS = Listeners()  # systemd's sockets, or one bound on HOST:PORT
PREFORK = True  # --workers N: N loops on one listening socket (core.prefork)

ACCEPT_BATCH = 128
#: At most this long between two housekeeping rounds (STATUS, watchdog, idle).
HOUSEKEEPING = 1.0


def new_loop(choice: str) -> tuple[asyncio.AbstractEventLoop, str]:
    """The loop ``--loop`` asks for ("auto": uvloop when installed) and its name."""
    if choice != "asyncio":
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            if choice == "uvloop":  # Settings.check() said it was there
                raise
        else:
            return cast(asyncio.AbstractEventLoop, uvloop.new_event_loop()), "uvloop"
    return asyncio.new_event_loop(), "asyncio"


class Echo(asyncio.Protocol):
    """One client: every byte back as it comes; the transport buffers the rest."""

    __slots__ = ("nbytes", "opened", "peer", "reads", "seen", "server", "stats", "transport", "why")

    def __init__(self, server: AioServer, peer: str) -> None:
        self.server = server
        self.stats = server.rt.stats
        self.peer = peer
        self.nbytes = self.reads = 0
        self.why = ""  # set before the server closes it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        # Past this many bytes waiting for the client, pause_writing() below.
        self.transport.set_write_buffer_limits(high=self.server.rt.settings.buffer_limit)
        self.opened = self.seen = self.server.loop.time()  # a silence is never longer than the connection
        self.server.connections.add(self)
        self.stats.connection_opened()

    def data_received(self, data: bytes) -> None:
        stats = self.stats
        stats.messages += 1
        stats.bytes += len(data)
        self.reads += 1
        self.nbytes += len(data)
        self.seen = self.server.clock
        self.transport.write(data)

    def eof_received(self) -> bool:
        """Half-close: False makes the transport write everything, then close."""
        return False

    def pause_writing(self) -> None:
        self.transport.pause_reading()  # backpressure: it reads nothing it cannot send back

    def resume_writing(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self, why: str) -> None:
        """Closed by the server: abort, as close() would wait for a client that does not read."""
        self.why = why
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.why:
            self.why = f"error: {exc.strerror if isinstance(exc, OSError) else exc}" if exc else "client closed"
        self.server.lost(self)


class LoopReaders:
    """The loop's readers behind a selector's register/unregister, for the shared Acceptor."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[socket.socket], None]) -> None:
        self.loop = loop
        self.callback = callback

    def register(self, fileobj: socket.socket, events: int, data: Any = None) -> None:
        self.loop.add_reader(fileobj.fileno(), self.callback, fileobj)

    def unregister(self, fileobj: socket.socket) -> None:
        self.loop.remove_reader(fileobj.fileno())


class AioServer:
    def __init__(self, runtime: Runtime, loop: asyncio.AbstractEventLoop) -> None:
        self.rt = runtime
        self.loop = loop
        self.connections: set[Echo] = set()
        self.accepted = 0  # accepted and not yet lost: attached or about to be
        self.acceptor = Acceptor(LoopReaders(loop, self.accept), runtime)
        self.pressure = Pressure()
        self.clock = self.last_sweep = loop.time()  # a coarse clock for idle times, set by housekeeping
        self.next_sweep = 0.0

    # -- accepting --------------------------------------------------------------
    def room(self) -> bool:
        return self.accepted < self.rt.settings.max_connections

    def accept(self, listener: socket.socket) -> None:
        """A bounded batch, so a flood of connections cannot starve the echoes."""
        for _ in range(ACCEPT_BATCH):
            if not self.room():
                self.acceptor.update(False)
                return
            sock = self.acceptor.accept(listener)
            if sock is None:
                if not self.acceptor.listening:  # out of descriptors: paused, not spinning
                    self.loop.call_later(PAUSE, self.resume)
                return
            sock.setblocking(False)
            self.accepted += 1
            self.loop.create_task(self.attach(sock, self.acceptor.last_peer))

    async def attach(self, sock: socket.socket, peer: str) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: Echo(self, peer), sock)
        except OSError as error:  # reset before it was attached
            self.rt.log.debug("connection lost before it was served: %s", error)
            sock.close()
            self.accepted -= 1

    def resume(self) -> None:
        """Listen again after a pause (a timer may fire a hair early: then try again)."""
        self.acceptor.update(self.room())
        if self.room() and not self.acceptor.listening and not self.rt.stopping:
            self.loop.call_later(self.acceptor.timeout(PAUSE) + 0.001, self.resume)

    def lost(self, conn: Echo) -> None:
        self.connections.discard(conn)
        self.accepted -= 1
        self.rt.stats.open -= 1
        if self.rt.log.isEnabledFor(logging.DEBUG):
            seconds = self.loop.time() - conn.opened
            self.rt.log.debug("%s", connection_ended(conn.peer, seconds, conn.nbytes, conn.reads, conn.why))
        if self.rt.stopping:
            if not self.accepted:
                self.loop.stop()
        elif not self.acceptor.listening:
            self.acceptor.update(self.room())

    # -- signals, stop, housekeeping ---------------------------------------------
    def on_signals(self) -> None:
        self.rt.on_signals()
        if self.rt.stopping and self.rt.listeners:
            self.acceptor.update(False)  # stopping: the listeners leave the loop and close
            if not self.accepted:
                self.loop.stop()

    def close_idle(self, now: float, before: float) -> float:
        """Close the connections silent too long; seconds until the next look.

        At the limit with connections waiting, "too long" may be much
        shorter (``Pressure``): then at most as many are shed as wait, the
        idlest first, and only ones silent since the last look (``before``)."""
        idle = self.rt.settings.idle_timeout
        if idle <= 0:
            return HOUSEKEEPING
        full = not self.room() and not self.rt.stopping
        queued = waiting(self.rt.listeners) if full else 0
        allowed = self.pressure.silence_allowed(idle, queued, now)
        for conn in [c for c in self.connections if now - c.seen >= idle and not c.why]:
            self.rt.stats.idle_closed += 1
            conn.close(idle_reason(idle))
        if queued and allowed < idle:
            silent = (c for c in self.connections if c.seen < before and now - c.seen >= allowed and not c.why)
            for conn in heapq.nsmallest(queued, silent, key=attrgetter("seen")):
                self.rt.stats.shed += 1
                conn.close(shed_reason(now - conn.seen, queued))
                queued -= 1
        return PRESSURE_POLL if full else min(HOUSEKEEPING, idle / 4)

    def housekeeping(self) -> None:
        rt = self.rt
        self.clock = now = self.loop.time()
        if now >= self.next_sweep:
            self.next_sweep = now + self.close_idle(now, self.last_sweep)
            self.last_sweep = now
        if rt.grace_expired() and self.connections:
            rt.log.info("grace period over: closing %d connections", len(self.connections))
            for conn in list(self.connections):
                conn.close("grace period over")
        rt.tick()
        delay = min(rt.timeout(), self.next_sweep - self.loop.time())
        self.loop.call_later(max(delay, 0.001), self.housekeeping)

    def serve(self, loop_name: str) -> None:
        rt = self.rt
        limit = raise_fd_limit()
        if "max_connections" not in rt.settings.explicit:  # stay clear of EMFILE by default
            rt.settings.max_connections = min(rt.settings.max_connections, max(1, limit - 16))
        self.loop.add_reader(rt.signals.fileno(), self.on_signals)
        self.loop.call_soon(rt.signals.rearm)  # uvloop takes the wakeup fd when it starts running
        self.acceptor.update(room=True)
        self.housekeeping()
        rt.ready(", ".join(describe(sock) for sock in rt.listeners) + f" ({loop_name})")
        try:
            self.loop.run_forever()
        finally:
            self.loop.remove_reader(rt.signals.fileno())
            self.loop.close()
            rt.close_listeners()


def serve(runtime: Runtime) -> None:
    loop, name = new_loop(runtime.settings.loop)
    AioServer(runtime, loop).serve(name)
