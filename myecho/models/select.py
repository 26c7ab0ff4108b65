"""The select model: one process, one event loop, non-blocking sockets.

The talk's "mono" daemon, cured of the weaknesses it listed:
- a slow or silent client never delays the others: nothing blocks;
- a client that sends without reading gets backpressure: once
  ``buffer_limit`` bytes wait for it, its reads pause until it drains them,
  so the server holds at most about ``buffer_limit`` + one read per client;
- an accept flood is taken in bounded batches, and running out of file
  descriptors (EMFILE) pauses accepting for a moment instead of spinning;
- ``selectors`` picks epoll here: no FD_SETSIZE cap at 1,024 as PHP's
  stream_select had, and no cost that grows with idle connections.
"""

import contextlib
import selectors
import socket

from myecho.accepting import LISTENER, Acceptor
from myecho.runtime import Runtime
from myecho.sockets import describe, raise_fd_limit

CHUNK = 65536
ACCEPT_BATCH = 128
READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class Connection:
    """One client: its socket, the bytes it has not read back yet, EOF seen."""

    __slots__ = ("eof", "events", "pending", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = bytearray()
        self.eof = False
        self.events = READ


class SelectServer:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.selector = selectors.DefaultSelector()
        self.connections: dict[int, Connection] = {}
        self.acceptor = Acceptor(self.selector, runtime)

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
            conn = Connection(sock)
            self.connections[sock.fileno()] = conn
            self.selector.register(sock, READ, conn)
            self.rt.stats.connection_opened()

    # -- echoing ----------------------------------------------------------------
    def want(self, conn: Connection, events: int) -> None:
        if events != conn.events:
            conn.events = events
            self.selector.modify(conn.sock, events, conn)

    def close(self, conn: Connection) -> None:
        self.selector.unregister(conn.sock)
        del self.connections[conn.sock.fileno()]
        conn.sock.close()
        self.rt.stats.open -= 1

    def on_readable(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
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
        if conn.pending:
            conn.pending += data
        else:
            try:  # most of the time the whole echo leaves at once: no extra poll
                sent = conn.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close(conn)
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
        except OSError:
            self.close(conn)
            return
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
        self.close(conn)

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
        while not (rt.stopping and not self.connections):
            for key, mask in select(self.acceptor.timeout(rt.timeout())):
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
            self.acceptor.update(self.room())
            if rt.grace_expired() and self.connections:
                rt.log.info("grace period over: closing %d connections", len(self.connections))
                for conn in list(self.connections.values()):
                    self.close(conn)
            rt.tick()
        self.selector.close()
        rt.close_listeners()


def serve(runtime: Runtime) -> None:
    SelectServer(runtime).serve()
