"""The broker and its workers on one host: the zmq model's face, LRU, heartbeats, retries."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
from support import Server, command, random_bytes, req, wait_status

from myecho.bench import measure
from myecho.bench.harness import NotifySocket, free_port

Context = zmq.Context[zmq.Socket[bytes]]
FAST = ["--heartbeat", "0.2", "--liveness", "3"]  # a dead worker is noticed in 0.6 s


def following(server: Server) -> Server:
    """Its notify socket read all the time, as systemd does (see NotifySocket.follow)."""
    assert server.notify is not None
    server.notify.follow()
    return server


class Pool:
    """A broker on two free ports, and the workers started for it."""

    def __init__(self, started: list[Server], beats: list[str], backend: str = "", extra: tuple[str, ...] = ()) -> None:
        self.started = started
        self.beats = beats
        self.extra = extra
        self.front = free_port()
        self.url = f"tcp://127.0.0.1:{self.front}"
        self.backend = backend or f"tcp://127.0.0.1:{free_port()}"
        self.broker = self.start_broker()

    def start_broker(self, *extra: str) -> Server:
        argv = [command("myecho"), "serve", "broker", "--port", str(self.front), "--backend", self.backend]
        server = following(Server([*argv, *self.beats, *self.extra, *extra], self.front))
        self.started.append(server)
        return server.wait_ready()

    def worker(self, *extra: str) -> Server:
        argv = [command("myecho"), "serve", "worker", "--connect", self.backend, *self.beats, *extra]
        server = following(Server(argv, 0))
        self.started.append(server)
        return server.wait_ready()

    def workers(self, count: int) -> str:
        return wait_status(self.broker, f"; {count} worker{'' if count == 1 else 's'} (")


@pytest.fixture
def pool() -> Iterator[Callable[..., Pool]]:
    started: list[Server] = []

    def make(workers: int = 2, beats: list[str] = FAST, backend: str = "", extra: tuple[str, ...] = ()) -> Pool:
        made = Pool(started, beats, backend, extra)
        for _ in range(workers):
            made.worker()
        if workers:
            made.workers(workers)
        return made

    yield make
    for server in reversed(started):
        with contextlib.suppress(AssertionError, ProcessLookupError):
            server.signal(signal.SIGCONT)
            server.stop(timeout=10)
        server.kill()


def dealer(ctx: Context, url: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    return sock


def messages_of(server: Server) -> int:
    """How many requests a worker answered, from its last words."""
    assert server.stop() == 0
    assert server.notify is not None
    status = server.notify.wait_for("STOPPING", "1")["STATUS"]
    found = re.search(r"(\d+) messages", status)
    assert found, status
    return int(found.group(1))


def test_a_req_client_sees_the_zmq_model(pool: Callable[..., Pool], context: Context) -> None:
    p = pool(2)
    client = req(context, p.url)
    client.send(b"bonjour")
    assert client.recv() == b"bonjour"
    for payload in (b"", b"\x00\xff\xc3\x28", random_bytes(10 * 1024 * 1024)):
        client.send(payload)
        assert client.recv() == payload
    frames = [b"one", b"", b"\x00three", b"x" * 100_000]
    client.send_multipart(frames)
    assert client.recv_multipart() == frames
    # A DEALER with 100 requests in flight gets its replies in order, as from the zmq model.
    many = dealer(context, p.url)
    for number in range(100):
        many.send_multipart([b"", b"request %d" % number])
    many.setsockopt(zmq.RCVTIMEO, 10_000)
    assert [many.recv_multipart() for _ in range(100)] == [[b"", b"request %d" % n] for n in range(100)]


def test_the_talks_php_client_through_the_broker(pool: Callable[..., Pool]) -> None:
    php = shutil.which("php")
    assert php, "php is missing: apt-get install php-cli php-zmq"
    p = pool(1)
    code = (
        f"$c = new ZMQSocket(new ZMQContext(), ZMQ::SOCKET_REQ); $c->connect('{p.url}');"
        "$c->send('bonjour'); print($c->recv());"
    )
    result = subprocess.run([php, "-r", code], capture_output=True, timeout=30)
    assert result.stdout == b"bonjour", result.stderr.decode()


def test_least_recently_used_spreads_the_load(pool: Callable[..., Pool], context: Context) -> None:
    p = pool(0)
    first, second = p.worker(), p.worker()
    p.workers(2)
    failures: list[bytes] = []

    def client(number: int) -> None:
        sock = req(context, p.url)
        for turn in range(50):
            message = b"%d/%d" % (number, turn)
            sock.send(message)
            if sock.recv() != message:
                failures.append(message)
        sock.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    counts = [messages_of(first), messages_of(second)]
    assert sum(counts) == 400
    assert min(counts) >= 100, counts  # both took a fair part


def test_clients_wait_while_no_worker_is_free(pool: Callable[..., Pool], context: Context) -> None:
    p = pool(0)
    client = req(context, p.url)
    client.send(b"anyone?")
    assert not client.poll(500)  # held in libzmq's queue: the broker does not read it
    assert "0 workers" in wait_status(p.broker, "messages")
    p.worker()
    assert client.poll(5000)
    assert client.recv() == b"anyone?"


def test_a_hung_worker_is_replaced_and_its_late_answer_dropped(pool: Callable[..., Pool], context: Context) -> None:
    p = pool(0)
    hung = p.worker()
    p.workers(1)
    hung.signal(signal.SIGSTOP)  # it still looks alive for 0.6 s: it gets the request
    client = dealer(context, p.url)
    sent = time.monotonic()
    client.send_multipart([b"", b"held"])
    time.sleep(0.1)
    p.worker()
    assert client.poll(5000), "the held request was never retried"
    assert client.recv_multipart() == [b"", b"held"]
    assert 0.3 < time.monotonic() - sent < 6  # held until the sleeper's silence gave it away
    hung.signal(signal.SIGCONT)  # it wakes up and answers too: the broker drops that one
    assert "1 late replies dropped" in wait_status(p.broker, "late")
    assert not client.poll(300)
    status = wait_status(p.broker, "retried")
    assert "1 retried" in status
    assert "2 workers" in status  # the sleeper came back to the pool


def test_a_killed_worker_is_noticed_at_once(pool: Callable[..., Pool], context: Context) -> None:
    p = pool(0, beats=["--heartbeat", "1", "--liveness", "10"])  # silence alone would take 10 s
    victim = p.worker()
    p.workers(1)
    victim.signal(signal.SIGSTOP)
    client = dealer(context, p.url)
    client.send_multipart([b"", b"held"])
    time.sleep(0.1)
    p.worker()
    p.workers(2)
    victim.signal(signal.SIGKILL)  # its connection closes: the broker sees it
    started = time.monotonic()
    assert client.poll(5000)
    assert client.recv_multipart() == [b"", b"held"]
    assert time.monotonic() - started < 1.0


def test_workers_find_a_restarted_broker(pool: Callable[..., Pool], context: Context) -> None:
    p = pool(2)
    assert p.broker.stop() == 0
    p.broker = p.start_broker()
    p.workers(2)
    client = req(context, p.url)
    client.send(b"again")
    assert client.recv() == b"again"


def test_a_worker_that_leaves_says_goodbye(pool: Callable[..., Pool], context: Context) -> None:
    p = pool(2)
    leaving = p.started[-1]
    assert leaving.stop() == 0
    assert "1 worker (" in wait_status(p.broker, "worker")
    assert "it said goodbye" in p.broker.stderr
    client = req(context, p.url)
    client.send(b"still here")
    assert client.recv() == b"still here"


def test_every_direction_reversed_over_ipc(tmp_path: Path, context: Context) -> None:
    """Clients and workers bind; the broker connects to both."""
    clients, workers = f"ipc://{tmp_path}/clients", f"ipc://{tmp_path}/workers"
    client = context.socket(zmq.REQ)
    client.setsockopt(zmq.RCVTIMEO, 10_000)
    client.bind(clients)
    worker = Server([command("myecho"), "serve", "worker", "--connect", "@" + workers, *FAST], 0)
    broker = Server(
        [command("myecho"), "serve", "broker", "--frontend", ">" + clients, "--backend", ">" + workers, *FAST], 0
    )
    try:
        assert worker.notify is not None
        assert "bound, waiting for the broker" in worker.notify.wait_for("READY", "1")["STATUS"]
        broker.wait_ready()
        wait_status(broker, "; 1 worker (")
        client.send(b"reversed")
        assert client.recv() == b"reversed"
        assert broker.stop() == 0
        assert worker.stop() == 0
    finally:
        broker.kill()
        worker.kill()


def test_sockets_from_systemd(context: Context) -> None:
    """Both ports from socket activation, named as a socket unit would name them."""
    front, back = free_port(), free_port()
    notify = NotifySocket()
    setenv = [f"--setenv=NOTIFY_SOCKET={notify.path}"] + [
        f"--setenv={name}" for name in os.environ if name.startswith("COVERAGE_")
    ]
    tool = shutil.which("systemd-socket-activate")
    assert tool, "systemd-socket-activate is missing: apt-get install systemd"
    # Named the other way round on purpose: names win over order.
    argv = [
        tool,
        f"--listen=127.0.0.1:{back}",
        f"--listen=127.0.0.1:{front}",
        "--fdname=backend:frontend",
        *setenv,
        command("myecho"),
        "serve",
        "broker",
        "--port",
        str(free_port()),
        *FAST,
    ]
    broker = subprocess.Popen(argv, stderr=subprocess.PIPE)
    worker = Server([command("myecho"), "serve", "worker", "--connect", f"tcp://127.0.0.1:{back}", *FAST], 0)
    try:
        ready = notify.wait_for("READY", "1")
        assert f"clients on tcp://127.0.0.1:{front}" in ready["STATUS"]
        worker.wait_ready()
        client = req(context, f"tcp://127.0.0.1:{front}")
        client.send(b"activated")
        assert client.recv() == b"activated"
    finally:
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(15) == 0
        worker.kill()
        notify.close()


def test_the_worker_reads_the_brokers_address_from_the_config_file(tmp_path: Path, pool: Callable[..., Pool]) -> None:
    p = pool(0)
    config = tmp_path / "default"
    config.write_text(f"MYECHO_WORKER_CONNECT={p.backend}\nMYECHO_HEARTBEAT=0.2\n")
    worker = Server([command("myecho"), "serve", "worker", "--config", str(config)], 0)
    p.started.append(worker)
    assert worker.notify is not None
    assert p.backend in worker.notify.wait_for("READY", "1")["STATUS"]
    p.workers(1)


def test_inproc_everything_in_one_process() -> None:
    """The broker in the main thread, workers and a client in threads, all inproc."""
    code = textwrap.dedent("""
        import json, logging, os, signal, socket, threading, time, zmq
        from myecho.models.broker import Broker
        from myecho.models.worker import EchoWorker
        from myecho.core.runtime import Runtime, Stats
        from myecho.core.settings import Settings

        class ThreadRuntime:  # what a worker uses of a Runtime, for one in a thread (signals are the main thread's)
            def __init__(self, settings):
                self.settings, self.log, self.stats = settings, logging.getLogger("myecho"), Stats()
                self.signals, self.waker = socket.socketpair()
                self.stopping, self.stop_deadline = False, float("inf")
            def stop(self):
                self.waker.send(b"T")
            def on_signals(self):
                self.stopping, self.stop_deadline = True, time.monotonic() + 1.0
            def ready(self, where):
                pass
            def timeout(self):
                return 1.0
            def tick(self):
                pass

        ctx = zmq.Context.instance()
        settings = Settings(model="broker", broker_frontend=["inproc://front"], broker_backend=["inproc://back"])
        runtime = Runtime(settings, [])
        broker = Broker(runtime, ctx)
        runtimes = [ThreadRuntime(Settings(model="worker", worker_connect="inproc://back", heartbeat=0.2))
                    for _ in range(2)]
        workers = [EchoWorker(rt, ctx) for rt in runtimes]
        threads = [threading.Thread(target=w.serve) for w in workers]
        def client():
            req = ctx.socket(zmq.REQ)
            req.connect("inproc://front")
            for n in range(200):
                req.send_multipart([b"in", b"process %d" % n])
                assert req.recv_multipart() == [b"in", b"process %d" % n]
            req.close()
            print(json.dumps(sorted(w.stats.messages for w in workers)))
            os.kill(os.getpid(), signal.SIGTERM)
        threads.append(threading.Thread(target=client))
        for thread in threads:
            thread.start()
        broker.serve()
        for rt in runtimes:
            rt.stop()
        for thread in threads:
            thread.join()
        runtime.finish()
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    counts = json.loads(result.stdout)
    assert sum(counts) == 200 and min(counts) > 0, counts  # both workers served


def test_kill_under_load_nothing_lost_nothing_twice() -> None:
    """Four client processes, two workers, one SIGKILLed mid-run (myecho.bench.measure)."""
    result = measure.crash_cost("kill", workers=2, clients=4, seconds=1.5, heartbeat=0.2)
    assert result["answered"] == result["sent"] > 100
    assert (result["lost"], result["duplicates"], result["strays"]) == (0, 0, 0)
    assert result["added_ms"] is not None and result["added_ms"] < 1000


def test_a_worker_started_before_its_broker(pool: Callable[..., Pool], context: Context) -> None:
    """The worker gives up on the silence, starts afresh (backoff), and finds the broker when it comes."""
    backend = f"tcp://127.0.0.1:{free_port()}"
    worker = following(
        Server([command("myecho"), "serve", "worker", "--connect", backend, "--heartbeat", "0.1", "--liveness", "2"], 0)
    ).wait_ready()
    try:
        deadline = time.monotonic() + 10
        while "broker silent for" not in worker.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reconnecting (attempt 1)" in worker.stderr
        time.sleep(0.5)  # a few more attempts, with backoff
        p = pool(0, beats=["--heartbeat", "0.1", "--liveness", "2"], backend=backend)
        p.workers(1)
        client = req(context, p.url)
        client.send(b"found you")
        assert client.recv() == b"found you"
        assert worker.stop() == 0
    finally:
        worker.kill()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["worker", "--window", "0"], "window 0 is not in 1-1024"),
        (["broker", "--request-timeout", "nan"], "request-timeout must be a finite number, not nan"),
        (["broker", "--hold-timeout", "inf"], "hold-timeout must be a finite number, not inf"),
        (["broker", "--max-message", "2000", "--client-bytes", "1000"], "max-message <= client-bytes"),
    ],
)
def test_the_new_settings_are_checked(argv: list[str], message: str) -> None:
    """A bad deadline, window or byte limit: one line, a non-zero exit, no traceback."""
    result = subprocess.run([command("myecho"), "serve", *argv], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
