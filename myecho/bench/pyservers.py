"""The references a Python user would otherwise pick: asyncio, uvloop, pyzmq.

``python -m myecho.bench.pyservers asyncio|uvloop --port P`` runs a plain
``asyncio.Protocol`` echo (the fastest way asyncio offers: no streams
layer) on the standard loop or on uvloop. ``pyzmq`` runs the smallest
ROUTER echo pyzmq allows, set up as the C one (``zmq-echo``) is: the
floor of the zmq model's runtime, with none of myecho's bounds, counts or
housekeeping. ``zmqproxy`` leaves Python out of the echo altogether:
libzmq's own proxy, the ROUTER as both its ends (a reflector), run from a
thread of ours; what a Python program gets when it gives up inspecting
messages (no per-client byte bound: only the high-water mark in messages).
Each sends READY=1 to $NOTIFY_SOCKET like the models do, so the bench
starts every server the same way, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from typing import Any, cast

from myecho.core.sockets import raise_fd_limit


class Echo(asyncio.Protocol):
    """Every byte back as it comes; the transport buffers what the peer has not read."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool | None:
        return False  # close our side too: the half-closing client gets EOF after its bytes


def notify_ready() -> None:
    """sd_notify(READY=1) without libsystemd: one datagram to $NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", path)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notify_ready()
    async with server:
        await stop.wait()


def zmq_router(host: str, port: int, mandatory: int) -> tuple[Any, Any]:
    """A context of 2 I/O threads and a ROUTER bound on HOST:PORT, set up as ``zmq-echo``'s."""
    import zmq

    context = zmq.Context(io_threads=2)
    router = context.socket(zmq.ROUTER)
    for option, value in (
        (zmq.ROUTER_MANDATORY, mandatory),
        (zmq.SNDHWM, 1000),
        (zmq.RCVHWM, 1000),
        (zmq.BACKLOG, 4096),
        (zmq.LINGER, 0),
        (zmq.MAXMSGSIZE, 64 * 1024 * 1024),
    ):
        router.setsockopt(option, value)
    router.bind(f"tcp://{host}:{port}")
    return context, router


def stop_signals() -> tuple[socket.socket, list[int]]:
    """SIGTERM and SIGINT noted in a list, and a socket that wakes a poll when one comes."""
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    stop: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: stop.append(number))
    return wake_r, stop


def serve_zmqproxy(host: str, port: int) -> None:
    """libzmq's proxy with one ROUTER as frontend and backend: each message goes
    back out of the socket it came in by, to the routing id it came from.
    Not mandatory routing: a reply to a client past its high-water mark is
    dropped by libzmq, as the proxy cannot be told. TERMINATE on the control
    socket ends it at SIGTERM."""
    import threading

    import zmq

    context, router = zmq_router(host, port, mandatory=0)
    control, theirs = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    control.bind("inproc://control")
    theirs.connect("inproc://control")
    proxy = threading.Thread(target=zmq.proxy_steerable, args=(router, router, None, theirs))
    proxy.start()
    wake, stop = stop_signals()
    notify_ready()
    while not stop:
        zmq.zmq_poll([(wake.fileno(), zmq.POLLIN)], -1)
    control.send(b"TERMINATE")
    proxy.join()
    for sock in (control, theirs, router):
        sock.close()
    context.term()


def serve_pyzmq(host: str, port: int) -> None:
    """A ROUTER echo on pyzmq's cheapest calls, shaped as ``zmq-echo`` is in C:
    every frame sent back as it is read (zero-copy), the queue read until
    libzmq says EAGAIN (here ``zmq.Again``, once per wake-up), then a poll."""
    import zmq

    from myecho.core.zmqfront import NOBLOCK, NOBLOCK_SNDMORE, calls

    context, router = zmq_router(host, port, mandatory=1)
    wake_r, stop = stop_signals()
    fast = calls(router)
    recv, send = fast.recv, fast.send
    items: list[tuple[Any, int]] = [(router, zmq.POLLIN), (wake_r.fileno(), zmq.POLLIN)]
    notify_ready()
    while not stop:
        for sock, _ in zmq.zmq_poll(items, -1):
            if sock is not router:
                continue
            while True:
                try:
                    frame = recv(NOBLOCK, copy=False)
                except zmq.Again:
                    break
                more, sending = frame.more, True
                while True:  # the rest of a message is always there
                    if sending:
                        try:
                            send(frame, NOBLOCK_SNDMORE if more else NOBLOCK, copy=False)
                        except zmq.ZMQError:  # the client left or does not read: drop the rest
                            sending = False
                    if not more:
                        break
                    frame = recv(0, copy=False)
                    more = frame.more
    router.close()
    context.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m myecho.bench.pyservers", description=__doc__)
    parser.add_argument("loop", choices=("asyncio", "uvloop", "pyzmq", "zmqproxy"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args(argv)
    raise_fd_limit()
    if options.loop == "pyzmq":
        serve_pyzmq(options.host, options.port)
    elif options.loop == "zmqproxy":
        serve_zmqproxy(options.host, options.port)
    elif options.loop == "uvloop":
        import uvloop

        # uvloop.run() is 0.18's; Debian 12 ships 0.17, which has new_event_loop().
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(options.host, options.port))
    else:
        asyncio.run(serve(options.host, options.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
