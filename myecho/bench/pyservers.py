"""The references a Python user would otherwise pick: asyncio and uvloop.

``python -m myecho.bench.pyservers asyncio|uvloop --port P`` runs a plain
``asyncio.Protocol`` echo (the fastest way asyncio offers: no streams
layer) on the standard loop or on uvloop. It sends READY=1 to
$NOTIFY_SOCKET like the models do, so the bench starts every server the
same way, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from typing import cast

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m myecho.bench.pyservers", description=__doc__)
    parser.add_argument("loop", choices=("asyncio", "uvloop"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args(argv)
    raise_fd_limit()
    if options.loop == "uvloop":
        import uvloop

        uvloop.run(serve(options.host, options.port))
    else:
        asyncio.run(serve(options.host, options.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
