"""The asyncio model: the talk's last word ("libevent, eio, ..."), today.

An event library runs the loop and calls us back: an ``asyncio.Protocol``
per connection, on uvloop's loop (libuv, the C event library behind
Node.js) when it is installed, else on asyncio's own. What sits around it
is the shared layer the select model has:
- listening sockets from myecho.sockets (systemd's, or bound), accepted
  here in bounded batches so that ``max_connections`` and running out of
  file descriptors can stop accepting for a while (connections wait in the
  kernel's backlog; the loop does not spin on EMFILE);
- backpressure: a transport holding more than ``buffer_limit`` bytes for
  a client that does not read pauses that client's reads;
- signals through the runtime's fd, graceful stop, SIGHUP reload,
  READY/STATUS/WATCHDOG from a timer of the loop; idle connections closed
  after ``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
from typing import cast

from myecho.accepting import PAUSE, RESOURCE_ERRORS
from myecho.runtime import Runtime
from myecho.sockets import describe, raise_fd_limit

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

    __slots__ = ("seen", "server", "stats", "transport")

    def __init__(self, server: AioServer) -> None:
        self.server = server
        self.stats = server.rt.stats
        self.seen = server.clock

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        # Past this many bytes waiting for the client, pause_writing() below.
        self.transport.set_write_buffer_limits(high=self.server.rt.settings.buffer_limit)
        self.server.connections.add(self)
        self.stats.connection_opened()

    def data_received(self, data: bytes) -> None:
        stats = self.stats
        stats.messages += 1
        stats.bytes += len(data)
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

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.lost(self)


class AioServer:
    def __init__(self, runtime: Runtime, loop: asyncio.AbstractEventLoop) -> None:
        self.rt = runtime
        self.loop = loop
        self.connections: set[Echo] = set()
        self.accepted = 0  # accepted and not yet lost: attached or about to be
        self.listening = False
        self.clock = loop.time()  # a coarse clock for idle times, set by housekeeping
        self.next_sweep = 0.0

    # -- accepting --------------------------------------------------------------
    def room(self) -> bool:
        return self.accepted < self.rt.settings.max_connections

    def listen(self, wanted: bool) -> None:
        if wanted == self.listening:
            return
        for sock in self.rt.listeners:
            if wanted:
                self.loop.add_reader(sock.fileno(), self.accept, sock)
            else:
                self.loop.remove_reader(sock.fileno())
        self.listening = wanted

    def accept(self, listener: socket.socket) -> None:
        """A bounded batch, so a flood of connections cannot starve the echoes."""
        for _ in range(ACCEPT_BATCH):
            if not self.room():
                self.listen(False)
                return
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in RESOURCE_ERRORS:  # the connection stays pending: pause, do not spin
                    self.rt.log.warning("accept: %s; pausing %.1f s", error.strerror, PAUSE)
                    self.listen(False)
                    self.loop.call_later(PAUSE, self.resume)
                return
            sock.setblocking(False)
            self.accepted += 1
            self.loop.create_task(self.attach(sock))

    async def attach(self, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: Echo(self), sock)
        except OSError as error:  # reset before it was attached
            self.rt.log.debug("connection lost before it was served: %s", error)
            sock.close()
            self.accepted -= 1

    def resume(self) -> None:
        if not self.rt.stopping:
            self.listen(self.room())

    def lost(self, conn: Echo) -> None:
        self.connections.discard(conn)
        self.accepted -= 1
        self.rt.stats.open -= 1
        if self.rt.stopping:
            if not self.accepted:
                self.loop.stop()
        elif not self.listening:
            self.listen(self.room())

    # -- signals, stop, housekeeping ---------------------------------------------
    def on_signals(self) -> None:
        self.rt.on_signals()
        if self.rt.stopping and self.rt.listeners:
            self.listen(False)
            self.rt.close_listeners()
            if not self.accepted:
                self.loop.stop()

    def housekeeping(self) -> None:
        rt = self.rt
        self.clock = now = self.loop.time()
        idle = rt.settings.idle_timeout
        if idle > 0 and now >= self.next_sweep:
            self.next_sweep = now + min(HOUSEKEEPING, idle / 4)
            for conn in [c for c in self.connections if now - c.seen >= idle]:
                rt.log.debug("closing a connection idle for %.0f s", now - conn.seen)
                conn.transport.abort()  # close() would wait for a client that does not read
        if rt.grace_expired() and self.connections:
            rt.log.info("grace period over: closing %d connections", len(self.connections))
            for conn in list(self.connections):
                conn.transport.abort()
        rt.tick()
        delay = rt.timeout()
        if idle > 0:
            delay = min(delay, max(0.0, self.next_sweep - self.loop.time()))
        self.loop.call_later(max(delay, 0.001), self.housekeeping)

    def serve(self, loop_name: str) -> None:
        rt = self.rt
        limit = raise_fd_limit()
        if "max_connections" not in rt.settings.explicit:  # stay clear of EMFILE by default
            rt.settings.max_connections = min(rt.settings.max_connections, max(1, limit - 16))
        for sock in rt.listeners:
            sock.setblocking(False)
        self.loop.add_reader(rt.signals.fileno(), self.on_signals)
        self.loop.call_soon(rt.signals.rearm)  # uvloop takes the wakeup fd when it starts running
        self.listen(True)
        self.housekeeping()
        rt.ready(", ".join(describe(sock) for sock in rt.listeners) + f" ({loop_name})")
        try:
            self.loop.run_forever()
        finally:
            self.listen(False)
            self.loop.remove_reader(rt.signals.fileno())
            self.loop.close()
            rt.close_listeners()


def serve(runtime: Runtime) -> None:
    loop, name = new_loop(runtime.settings.loop)
    AioServer(runtime, loop).serve(name)
