"""Fixtures: the real servers on free loopback ports, a ZeroMQ context.

Only fixtures live here; the helpers tests import are in support.py. This
file is loaded for the system suite too, whose environment has neither
myecho nor pyzmq: both are imported inside the fixtures."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import zmq
    from support import ServeFactory, Server


@pytest.fixture
def serve() -> Iterator[ServeFactory]:
    """serve(model, *args, env=None) -> a ready Server; killed at teardown."""
    from support import Server, server_argv  # here: the system suite's environment has no myecho

    from myecho.bench.harness import free_port

    started: list[Server] = []

    def start(
        model: str, *extra: str, env: dict[str, str] | None = None, port: int | None = None, ready: bool = True
    ) -> Server:
        port = port or free_port()
        server = Server(server_argv(model, port, *extra), port, env=env, notify=model != "c")
        started.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in started:  # SIGTERM first: a graceful exit also saves coverage data
        with contextlib.suppress(AssertionError):
            server.stop(timeout=10)
        server.kill()


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    """A ZeroMQ context for the test's clients, destroyed after it (zmq is
    imported here: the system suite's environment has no pyzmq)."""
    import zmq

    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)
