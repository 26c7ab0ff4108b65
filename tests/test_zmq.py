"""The zmq model: the talk's REQ/REP exchange and what a real service meets."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import zmq
from support import ServeFactory, Server, command, random_bytes, req, wait_until

Context = zmq.Context[zmq.Socket[bytes]]


def test_the_talks_exchange(serve: ServeFactory, context: Context) -> None:
    server = serve("zmq")
    client = req(context, f"tcp://127.0.0.1:{server.port}")
    client.send(b"bonjour")
    assert client.recv() == b"bonjour"


def test_status_counts_open_connections(serve: ServeFactory, context: Context) -> None:
    """libzmq's monitor events (accepted, disconnected) are what STATUS counts."""
    server = serve("zmq")
    assert server.notify is not None
    clients = [req(context, f"tcp://127.0.0.1:{server.port}") for _ in range(2)]
    for client in clients:
        client.send(b"hi")
        assert client.recv() == b"hi"

    def status_says(text: str) -> bool:
        assert server.notify is not None
        return text in (server.notify.receive(2) or {}).get("STATUS", "")

    wait_until(lambda: status_says("2 open, 2 served, 2 messages, 4 bytes"), what="2 open in STATUS")
    clients.pop().close(linger=0)
    wait_until(lambda: status_says("1 open, 2 served"), what="1 open in STATUS")
    clients[0].close(linger=0)


def test_binary_and_large_messages(serve: ServeFactory, context: Context) -> None:
    server = serve("zmq")
    client = req(context, f"tcp://127.0.0.1:{server.port}")
    for payload in (b"", b"\x00\xff\xc3\x28", random_bytes(10 * 1024 * 1024)):
        client.send(payload)
        assert client.recv() == payload


def test_multipart_frame_for_frame(serve: ServeFactory, context: Context) -> None:
    server = serve("zmq")
    client = req(context, f"tcp://127.0.0.1:{server.port}")
    frames = [b"one", b"", b"\x00three", b"x" * 100_000]
    client.send_multipart(frames)
    assert client.recv_multipart() == frames


def test_dealer_client_with_requests_in_flight(serve: ServeFactory, context: Context) -> None:
    server = serve("zmq")
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 10_000)
    dealer.connect(f"tcp://127.0.0.1:{server.port}")
    for number in range(100):
        dealer.send_multipart([b"", b"request %d" % number])
    replies = [dealer.recv_multipart() for _ in range(100)]
    assert replies == [[b"", b"request %d" % number] for number in range(100)]


def test_thousand_req_clients_at_once(serve: ServeFactory, context: Context) -> None:
    server = serve("zmq")
    context.set(zmq.MAX_SOCKETS, 2000)
    clients = [req(context, f"tcp://127.0.0.1:{server.port}") for _ in range(1000)]
    for number, client in enumerate(clients):
        client.send(b"client %d" % number)
    for number, client in enumerate(clients):
        assert client.recv() == b"client %d" % number
    for client in clients:
        client.close()


def test_garbage_from_a_non_zeromq_peer_is_survived(serve: ServeFactory, context: Context) -> None:
    server = serve("zmq")
    for junk in (b"GET / HTTP/1.0\r\n\r\n", b"\xff" * 64, random_bytes(100_000), b"\x00"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            try:
                raw.sendall(junk)
                raw.shutdown(socket.SHUT_WR)
                raw.recv(4096)
            except OSError:
                pass
    client = req(context, f"tcp://127.0.0.1:{server.port}")
    client.send(b"still alive")
    assert client.recv() == b"still alive"
    assert server.proc.poll() is None


def test_never_reading_dealer_does_not_block_others(serve: ServeFactory, context: Context) -> None:
    """The stated policy: past the high-water mark its replies are dropped and counted."""
    server = serve("zmq")
    flooder = context.socket(zmq.DEALER)
    flooder.setsockopt(zmq.LINGER, 0)
    flooder.setsockopt(zmq.RCVHWM, 1)
    flooder.setsockopt(zmq.RCVBUF, 4096)
    flooder.connect(f"tcp://127.0.0.1:{server.port}")
    big = b"x" * 65536
    deadline = time.monotonic() + 20
    assert server.notify is not None
    status = ""
    while "dropped" not in status and time.monotonic() < deadline:
        for _ in range(200):
            try:
                flooder.send_multipart([b"", big], zmq.NOBLOCK)
            except zmq.Again:
                break
        message = server.notify.receive(0.05) or {}
        status = message.get("STATUS", status)
    assert "dropped" in status, status
    client = req(context, f"tcp://127.0.0.1:{server.port}")
    client.send(b"me too")
    assert client.recv() == b"me too"
    # The per-client bound in bytes (from the connection's TCP_INFO), before any high-water mark.
    assert "reply dropped: a client that does not read; its unread replies reached 16 MiB" in server.stderr


def test_ipc_endpoint(tmp_path: Path, context: Context) -> None:
    url = f"ipc://{tmp_path}/echo.sock"
    server = Server([command("myecho"), "serve", "zmq", "--listen", url], 0).wait_ready()
    try:
        client = req(context, url)
        client.send(b"over ipc")
        assert client.recv() == b"over ipc"
        assert server.stop() == 0
    finally:
        server.kill()


def test_inproc_endpoint_in_process() -> None:
    """inproc:// only exists inside one process: run the model in this one."""
    code = textwrap.dedent("""
        import threading, zmq
        from myecho.models.zmq import ZmqServer
        from myecho.core.runtime import Runtime
        from myecho.core.settings import Settings
        ctx = zmq.Context.instance()
        runtime = Runtime(Settings(model="zmq", listen=["inproc://echo"]), [])
        server = ZmqServer(runtime, ctx)
        def client():
            import os, signal, time
            time.sleep(0.2)
            req = ctx.socket(zmq.REQ)
            req.connect("inproc://echo")
            req.send_multipart([b"in", b"process"])
            print(req.recv_multipart())
            req.close()
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=client).start()
        server.serve()
        runtime.finish()
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert result.stdout.strip() == b"[b'in', b'process']", result.stderr.decode()


def test_the_talks_php_client(serve: ServeFactory) -> None:
    """The talk's own client, run by Debian's php-cli with php-zmq."""
    php = shutil.which("php")
    assert php, "php is missing: apt-get install php-cli php-zmq"
    server = serve("zmq")
    script = Path(tempfile.mkdtemp()) / "client.php"
    script.write_text(
        textwrap.dedent(f"""\
        <?php
        $ctx = new ZMQContext();
        $client = new ZMQSocket($ctx, ZMQ::SOCKET_REQ);
        $client->connect('tcp://localhost:{server.port}');
        $client->send('bonjour');
        $response = $client->recv();
        print("Réponse : '$response'\\n");
        """)
    )
    result = subprocess.run([php, str(script)], capture_output=True, timeout=30)
    assert result.stdout.decode() == "Réponse : 'bonjour'\n", result.stderr.decode()
    shutil.rmtree(script.parent)


def test_many_clients_from_threads(serve: ServeFactory, context: Context) -> None:
    server = serve("zmq")
    failures: list[str] = []

    def worker(number: int) -> None:
        client = req(context, f"tcp://127.0.0.1:{server.port}")
        for turn in range(200):
            message = b"%d/%d" % (number, turn)
            client.send(message)
            if client.recv() != message:
                failures.append(message.decode())
        client.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures


@pytest.mark.heavy
def test_ten_thousand_req_clients(serve: ServeFactory) -> None:
    """10,000 connections: two client processes (each REQ socket costs two fds)."""
    server = serve("zmq", "--log-level", "warning")
    code = textwrap.dedent(f"""
        import resource, sys, zmq
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        ctx = zmq.Context()
        ctx.set(zmq.MAX_SOCKETS, 6000)
        first = int(sys.argv[1])
        socks = []
        for n in range(first, first + 5000):
            s = ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, 60000)
            s.connect("tcp://127.0.0.1:{server.port}")
            socks.append(s)
        for n, s in enumerate(socks, first):
            s.send(b"%d" % n)
        bad = sum(s.recv() != b"%d" % n for n, s in enumerate(socks, first))
        print(bad)
        ctx.destroy(linger=0)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(first)], stdout=subprocess.PIPE) for first in (0, 5000)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert [out.strip() for out in outputs] == [b"0", b"0"]


def test_the_hot_loop_uses_pyzmqs_cython_calls() -> None:
    """With the pyzmq installed, the loops get the Cython layer's send (not the Python wrapper)."""
    import zmq

    from myecho.core import zmqfront

    assert zmqfront.CYTHON_SOCKET is not None
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as router:
        own = zmqfront.calls(router)
        assert own.send != router.send  # the wrapper is zmq.Socket.send
        assert zmqfront.calls(router, None).send == router.send


def test_fallback_when_pyzmq_is_laid_out_otherwise() -> None:
    """Should pyzmq's Cython socket class move, the loops use the public methods
    and stay byte-exact: multipart, empty and large frames, many in flight."""
    code = textwrap.dedent("""
        import os, signal, threading, zmq, zmq.backend
        zmq.backend.Socket = type("Moved", (), {})  # a pyzmq where our guess no longer holds
        from myecho.core import zmqfront
        from myecho.models.zmq import ZmqServer
        from myecho.core.runtime import Runtime
        from myecho.core.settings import Settings
        assert zmqfront.CYTHON_SOCKET is None
        ctx = zmq.Context.instance()
        runtime = Runtime(Settings(model="zmq", listen=["tcp://127.0.0.1:0"]), [])
        server = ZmqServer(runtime, ctx)
        assert server.calls.send == server.router.send
        messages = [[b"%d" % n, bytes(range(256)) * n, b"", b"\\xff" * (n * 1000)] for n in range(200)]
        def client():
            import time
            while not server.router.getsockopt(zmq.LAST_ENDPOINT):
                time.sleep(0.01)
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(server.router.getsockopt_string(zmq.LAST_ENDPOINT))
            for frames in messages:  # all in flight at once: several per wake-up
                dealer.send_multipart(frames)
            echoed = [dealer.recv_multipart() for _ in messages]
            print(echoed == messages, runtime.stats.messages)
            dealer.close()
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=client).start()
        server.serve()
        runtime.finish()
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert result.stdout.split() == [b"True", b"200"], result.stderr.decode()


def test_a_drain_asks_libzmq_once_and_raises_at_most_once() -> None:
    """What one wake-up of the loop costs in calls besides the frames: after the
    first message one ZMQ_EVENTS query; a drain of more ends on one zmq.Again.
    Every queued message is answered, byte for byte, to its own client."""
    import logging
    import types

    from myecho.core import zmqfront
    from myecho.core.runtime import Stats
    from myecho.models.zmq import ZmqServer

    class Counting:
        def __init__(self, inner: zmqfront.Calls) -> None:
            self.inner, self.events, self.again = inner, 0, 0

        def recv(self, *args: object, **kwargs: object) -> object:
            try:
                return self.inner.recv(*args, **kwargs)
            except zmq.Again:
                self.again += 1
                raise

        def send(self, *args: object, **kwargs: object) -> object:
            return self.inner.send(*args, **kwargs)

        def get(self, option: int) -> object:
            self.events += option == zmqfront.EVENTS
            return self.inner.get(option)

    stats = Stats()
    settings = types.SimpleNamespace(backlog=64)
    runtime = types.SimpleNamespace(stats=stats, log=logging.getLogger("test"), settings=settings)
    context: Context = zmq.Context()
    try:
        server = ZmqServer(runtime, context)  # type: ignore[arg-type]
        counting = Counting(server.calls)
        server.calls = counting  # type: ignore[assignment]
        # inproc: a message is in the ROUTER's queue once send() returns, so each
        # drain below sees exactly what was sent (no descriptor: no peer bound).
        server.router.bind("inproc://drain")
        clients = [context.socket(zmq.DEALER) for _ in range(8)]
        for client in clients:
            client.connect("inproc://drain")

        def queued(count: int) -> None:
            counting.events = counting.again = 0
            assert server.echo_pending()
            assert stats.messages == count

        clients[0].send_multipart([b"", b"one"])
        queued(1)
        assert (counting.events, counting.again) == (1, 0)  # one message: one query, no exception
        assert clients[0].recv_multipart() == [b"", b"one"]

        for number, client in enumerate(clients):
            for message in range(3):
                client.send_multipart([b"", b"%d" % number, bytes([message]) * (message * 1000)])
        queued(1 + 24)
        assert (counting.events, counting.again) == (1, 1)
        for number, client in enumerate(clients):
            for message in range(3):
                assert client.poll(5000)
                assert client.recv_multipart() == [b"", b"%d" % number, bytes([message]) * (message * 1000)]
    finally:
        context.destroy(linger=0)
