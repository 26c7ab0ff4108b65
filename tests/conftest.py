"""Fixtures: start the real servers on free loopback ports."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from support import Server, command, free_port

#: The byte-stream models, and the C reference held to the same contract.
#: "fork-classic" is the fork model as the talk wrote it: the parent forks
#: after accept (--spare-children 0) instead of handing over to a spare.
#: "asyncio" runs on uvloop (installed by the test extras), "asyncio-asyncio"
#: on asyncio's own loop; "select-2-workers" is select with --workers 2.
STREAM_MODELS = ("fork", "fork-classic", "select", "asyncio", "asyncio-asyncio", "select-2-workers", "c")

ServeFactory = Callable[..., Server]


def server_argv(model: str, port: int, *extra: str) -> list[str]:
    if model == "c":
        return [command("myecho-c"), *extra, str(port)]
    if model == "fork-classic":
        return [command("myecho"), "serve", "fork", "--spare-children", "0", "--port", str(port), *extra]
    if model == "asyncio-asyncio":
        return [command("myecho"), "serve", "asyncio", "--loop", "asyncio", "--port", str(port), *extra]
    if model == "select-2-workers":
        return [command("myecho"), "serve", "select", "--workers", "2", "--port", str(port), *extra]
    return [command("myecho"), "serve", model, "--port", str(port), *extra]


@pytest.fixture
def serve() -> Iterator[ServeFactory]:
    """serve(model, *args, env=None) -> a ready Server; killed at teardown."""
    started: list[Server] = []

    def start(model: str, *extra: str, env: dict[str, str] | None = None, port: int | None = None,
              ready: bool = True) -> Server:
        port = port or free_port()
        server = Server(server_argv(model, port, *extra), port, env=env, notify=model != "c")
        started.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in started:  # SIGTERM first: a graceful exit also saves coverage data
        with contextlib.suppress(AssertionError):
            server.stop(timeout=10)
        server.kill()


if TYPE_CHECKING:
    import zmq


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    """A ZeroMQ context for the test's clients, destroyed after it (zmq is
    imported here: the system suite's environment has no pyzmq)."""
    import zmq

    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)
