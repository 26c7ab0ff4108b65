"""The select model: one process, one event loop, non-blocking sockets.

The talk's "mono" daemon, cured of the weaknesses it listed:
- a slow or silent client never delays the others: nothing blocks;
- a client that sends without reading gets backpressure: once
  ``buffer_limit`` bytes wait for it, its reads pause until it drains them,
  so the server holds at most about ``buffer_limit`` + one read per client;
- an accept flood is taken in bounded batches, and running out of file
  descriptors (EMFILE) pauses accepting for a moment instead of spinning;
- ``selectors`` picks epoll here: no FD_SETSIZE cap at 1,024 as PHP's
  stream_select had, and no cost that grows with idle connections;
- a connection silent for ``idle_timeout`` is closed, and at the limit,
  with more connections waiting in the backlog, the connections silent the
  longest are closed first (an idle-connection flood cannot keep a new
  client out). Connections are kept in order of their last activity, so
  finding the idlest costs nothing.
"""

import contextlib
import logging
import selectors
import socket
import time
from collections import OrderedDict

from myecho.core.accepting import (
    LISTENER,
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

CHUNK = 65536
ACCEPT_BATCH = 128
READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class Connection:
    """One client: its socket, the bytes it has not read back yet, EOF seen."""

    __slots__ = ("activity", "eof", "events", "nbytes", "opened", "peer", "pending", "reads", "sock")

    def __init__(self, sock: socket.socket, now: float, peer: str) -> None:
        self.sock = sock
        self.pending = bytearray()
        self.eof = False
        self.events = READ
        self.opened = self.activity = now
        self.peer = peer
        self.nbytes = self.reads = 0


class SelectServer:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.selector = selectors.DefaultSelector()
        # Least recently active first: moved to the end at each read or send.
        self.connections: OrderedDict[int, Connection] = OrderedDict()
        self.acceptor = Acceptor(self.selector, runtime)
        self.now = time.monotonic()
        self.pressure = Pressure()

    def room(self) -> bool:
        return len(self.connections) < self.rt.settings.max_connections

    def accept(self, listener: socket.socket) -> None:
        """A bounded batch, so a flood of connections cannot starve the echoes."""
        for _ in range(ACCEPT_BATCH):
            if not self.room():
                return
            sock = self.acceptor.accept(listener)
            if sock is None:
                return
            sock.setblocking(False)
            conn = Connection(sock, self.now, self.acceptor.last_peer)
            self.connections[sock.fileno()] = conn
            self.selector.register(sock, READ, conn)
            self.rt.stats.connection_opened()

    # -- echoing ----------------------------------------------------------------
    def want(self, conn: Connection, events: int) -> None:
        if events != conn.events:
            conn.events = events
            self.selector.modify(conn.sock, events, conn)

    def close(self, conn: Connection, why: str = "error") -> None:
        self.selector.unregister(conn.sock)
        del self.connections[conn.sock.fileno()]
        conn.sock.close()
        self.rt.stats.open -= 1
        if self.rt.log.isEnabledFor(logging.DEBUG):
            line = connection_ended(conn.peer, time.monotonic() - conn.opened, conn.nbytes, conn.reads, why)
            self.rt.log.debug("%s", line)

    def active(self, conn: Connection) -> None:
        conn.activity = self.now
        self.connections.move_to_end(conn.sock.fileno())

    def on_readable(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.close(conn, f"error: {error.strerror}")
            return
        self.active(conn)
        if not data:
            conn.eof = True
            if conn.pending:
                self.want(conn, WRITE)
            else:
                self.finish(conn)
            return
        stats = self.rt.stats
        stats.messages += 1
        stats.bytes += len(data)
        conn.reads += 1
        conn.nbytes += len(data)
        if conn.pending:
            conn.pending += data
        else:
            try:  # most of the time the whole echo leaves at once: no extra poll
                sent = conn.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as error:
                self.close(conn, f"error: {error.strerror}")
                return
            if sent == len(data):
                return
            conn.pending += data[sent:]
        # Backpressure: past the limit, stop reading until the client drains.
        self.want(conn, WRITE if len(conn.pending) >= self.rt.settings.buffer_limit else READ | WRITE)

    def on_writable(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.pending)
        except BlockingIOError:
            return
        except OSError as error:
            self.close(conn, f"error: {error.strerror}")
            return
        if sent:
            self.active(conn)
        del conn.pending[:sent]
        if conn.pending:
            if len(conn.pending) < self.rt.settings.buffer_limit and not conn.eof:
                self.want(conn, READ | WRITE)
        elif conn.eof:
            self.finish(conn)
        else:
            self.want(conn, READ)

    def finish(self, conn: Connection) -> None:
        """Client half-closed and got everything back: close our side too."""
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        self.close(conn, "client closed")

    def close_idle(self) -> float:
        """Close the connections silent too long; seconds until the next is due.

        At the limit with connections waiting, "too long" may be much
        shorter (``Pressure``), and at most as many are shed as wait."""
        settings = self.rt.settings
        if settings.idle_timeout <= 0 or not self.connections:
            return float("inf")
        queued = waiting(self.rt.listeners) if not self.room() and not self.rt.stopping else 0
        allowed = self.pressure.silence_allowed(settings.idle_timeout, queued, self.now)
        while self.connections:
            conn = next(iter(self.connections.values()))  # the idlest
            silent = self.now - conn.activity
            if silent >= settings.idle_timeout:
                self.rt.stats.idle_closed += 1
                self.close(conn, idle_reason(settings.idle_timeout))
            elif queued > 0 and silent >= allowed:
                self.rt.stats.shed += 1
                self.close(conn, shed_reason(silent, queued))
                queued -= 1
            else:
                wake = conn.activity + (allowed if queued > 0 else settings.idle_timeout) - self.now
                return min(wake, PRESSURE_POLL) if not self.room() else wake
        return PRESSURE_POLL if not self.room() else float("inf")

    # -- the loop -----------------------------------------------------------------
    def serve(self) -> None:
        rt = self.rt
        limit = raise_fd_limit()
        if "max_connections" not in rt.settings.explicit:  # stay clear of EMFILE by default
            rt.settings.max_connections = min(rt.settings.max_connections, max(1, limit - 16))
        self.selector.register(rt.signals, READ, "signals")
        self.acceptor.update(room=True)
        rt.ready(", ".join(describe(sock) for sock in rt.listeners))
        select = self.selector.select
        idle_in = float("inf")
        while not (rt.stopping and not self.connections):
            ready = select(self.acceptor.timeout(min(rt.timeout(), idle_in)))
            self.now = time.monotonic()
            for key, mask in ready:
                conn = key.data
                if type(conn) is Connection:  # the common case first
                    if mask & READ:
                        self.on_readable(conn)
                    if mask & WRITE and conn.sock.fileno() in self.connections:
                        self.on_writable(conn)
                elif conn == LISTENER:
                    self.accept(key.fileobj)  # type: ignore[arg-type]
                else:
                    rt.on_signals()
            idle_in = max(0.0, self.close_idle())
            self.acceptor.update(self.room())
            if rt.grace_expired() and self.connections:
                rt.log.info("grace period over: closing %d connections", len(self.connections))
                for conn in list(self.connections.values()):
                    self.close(conn, "grace period over")
            rt.tick()
        self.selector.close()
        rt.close_listeners()


def serve(runtime: Runtime) -> None:
    SelectServer(runtime).serve()
