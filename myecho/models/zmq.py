"""The zmq model: the talk's REQ/REP echo, on a ROUTER socket.

The talk's server is a REP socket, which answers one request at a time in
a fixed order. A ROUTER socket speaks the same wire protocol to REQ clients
(each request arrives as [peer identity, empty delimiter, frames...] and
the reply goes back with the same envelope), but lets one loop serve every
client as its requests come, DEALER clients included, multipart messages
frame for frame. libzmq survives non-ZeroMQ peers itself: a bad greeting
only closes that connection. ``MAX_MESSAGE`` bounds what one message may
cost; a peer that sends more is disconnected by libzmq.

Replies to a client that never reads pile up to its high-water mark; then
they are dropped, counted (``dropped`` in STATUS) and logged, never queued
without bound and never allowed to block the other clients.
"""

import contextlib
import socket
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from myecho.runtime import Runtime
from myecho.sockets import zmq_endpoint

MAX_MESSAGE = 64 * 1024 * 1024
HIGH_WATER = 1000
BATCH = 256
DRAIN_IDLE = 0.2
#: libzmq's I/O threads accept connections and run their ZMTP handshakes:
#: with two, a burst of 1,000 new clients was set up 15-35 % faster on a
#: 2-core VM (libzmq's default is one; this loop stays single-threaded).
IO_THREADS = 2


def bind(router: zmq.Socket[bytes], listeners: list[socket.socket], urls: list[str]) -> list[str]:
    """Bind to the sockets we were handed (ZMQ_USE_FD) and to other endpoints."""
    where = []
    for sock in listeners:
        endpoint = zmq_endpoint(sock)
        router.setsockopt(zmq.USE_FD, sock.detach())  # libzmq owns the fd now
        router.bind(endpoint)
        where.append(router.getsockopt_string(zmq.LAST_ENDPOINT))
    router.setsockopt(zmq.USE_FD, -1)
    for url in urls:
        router.bind(url)
        where.append(router.getsockopt_string(zmq.LAST_ENDPOINT))
    return where


class ZmqServer:
    def __init__(self, runtime: Runtime, context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.rt = runtime
        self.context = context or zmq.Context.instance(io_threads=IO_THREADS)
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        self.router.setsockopt(zmq.SNDHWM, HIGH_WATER)
        self.router.setsockopt(zmq.RCVHWM, HIGH_WATER)
        self.router.setsockopt(zmq.BACKLOG, runtime.settings.backlog)
        self.monitor = self.router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.last_drop_log = 0.0

    def echo_pending(self) -> bool:
        """Answer up to BATCH waiting messages; True if there were any."""
        router, stats = self.router, self.rt.stats
        for count in range(BATCH):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return count > 0
            stats.messages += 1
            stats.bytes += sum(len(frame) for frame in frames[1:])
            try:
                router.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                self.dropped("its replies reached the high-water mark")
            except zmq.ZMQError as error:
                if error.errno != zmq.EHOSTUNREACH:  # the client left before its answer
                    raise
        return True

    def dropped(self, why: str) -> None:
        self.rt.stats.dropped += 1
        now = time.monotonic()
        if now - self.last_drop_log >= 10:
            self.rt.log.warning("reply dropped: a client that does not read; %s", why)
            self.last_drop_log = now

    def on_monitor(self) -> None:
        """Count connections from libzmq's monitor events (pyzmq parses them;
        parsing only the event number ourselves saved nothing measurable)."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.rt.stats.connection_opened()
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.rt.stats.open -= 1

    def serve(self) -> None:
        rt = self.rt
        where = bind(self.router, rt.listeners, rt.settings.listen)
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        poller.register(rt.signals.fileno(), zmq.POLLIN)
        rt.ready(", ".join(where))
        while not rt.stopping:
            events = dict(poller.poll(int(rt.timeout() * 1000)))
            if self.router in events:
                self.echo_pending()
            if self.monitor in events:
                self.on_monitor()
            if rt.signals.fileno() in events:
                rt.on_signals()
            rt.tick()
        self.drain(where)

    def drain(self, where: list[str]) -> None:
        """Stop taking connections, answer what is in flight, then close."""
        for endpoint in where:
            with contextlib.suppress(zmq.ZMQError):
                self.router.unbind(endpoint)
        while not self.rt.grace_expired():
            if not self.router.poll(int(DRAIN_IDLE * 1000), zmq.POLLIN):
                break
            self.echo_pending()
        linger = max(0.0, self.rt.stop_deadline - time.monotonic())
        self.router.disable_monitor()
        self.monitor.close(linger=0)
        self.router.close(linger=int(linger * 1000))


def serve(runtime: Runtime) -> None:
    ZmqServer(runtime).serve()
