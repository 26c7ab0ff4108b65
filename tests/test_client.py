"""``myecho client``: the talk's telnet session, as a pipe."""

from __future__ import annotations

import subprocess

from support import ServeFactory, command, random_bytes

from myecho.bench.harness import free_port


def client(*argv: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([command("myecho"), "client", *argv], input=data, capture_output=True, timeout=30)


def test_tcp_client_prints_every_echoed_byte(serve: ServeFactory) -> None:
    server = serve("select")
    data = b"Hello\nTest 1\nTest 2\n" + random_bytes(300_000) + b"no newline"
    result = client(f"127.0.0.1:{server.port}", data=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data


def test_zmq_client_one_request_per_line(serve: ServeFactory) -> None:
    server = serve("zmq")
    result = client("--zmq", f"tcp://127.0.0.1:{server.port}", data=b"bonjour\nau revoir\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"bonjour\nau revoir\n"
    result = client("--zmq", f"127.0.0.1:{server.port}", data=b"no scheme\n")
    assert result.stdout == b"no scheme\n"


def test_nothing_listening_is_a_one_line_error() -> None:
    result = client(f"127.0.0.1:{free_port()}", data=b"x")
    assert result.returncode == 1
    assert result.stderr.decode().startswith("myecho client: cannot connect to")
    assert len(result.stderr.splitlines()) == 1


def test_zmq_client_gives_up_on_a_silent_server() -> None:
    result = client("--zmq", "--timeout", "0.5", f"tcp://127.0.0.1:{free_port()}", data=b"anyone?\n")
    assert result.returncode == 1
    assert b"no answer" in result.stderr


def test_socat_an_independent_client(serve: ServeFactory) -> None:
    """A client nobody here wrote: socat, byte for byte."""
    import shutil

    socat = shutil.which("socat")
    assert socat, "socat is missing: apt-get install socat"
    for model in ("fork", "select", "c"):
        server = serve(model)
        data = random_bytes(2_000_000, seed=len(model))
        result = subprocess.run(
            [socat, "-t", "10", "-", f"TCP:127.0.0.1:{server.port}"], input=data, capture_output=True, timeout=60
        )
        assert result.stdout == data, model


def test_zmq_client_over_ipv6(serve: ServeFactory) -> None:
    port = free_port()
    serve("zmq", "--host", "::1", port=port)
    result = client("--zmq", f"tcp://[::1]:{port}", data=b"over ipv6\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"over ipv6\n"
