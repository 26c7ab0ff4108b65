"""The reference servers the bench starts beside the models, and its
process accounting, over real loopback."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from support import roundtrip

from myecho.bench import procs
from myecho.bench.harness import ServerProcess
from myecho.bench.servers import BY_NAME, MODELS, SCENARIOS, Server, launch_command, unavailable


@pytest.mark.parametrize(
    "name", ["asyncio", "uvloop", "aio", "select-2", "c", "epoll", "inetd-systemd", "inetd-xinetd"]
)
def test_reference_servers_echo_and_stop(name: str) -> None:
    if name == "uvloop" and importlib.util.find_spec("uvloop") is None:
        pytest.skip("uvloop is not installed")
    model = BY_NAME[name]
    if unavailable(model):
        pytest.skip(unavailable(model) or "")
    server = Server.start(model)
    try:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            assert roundtrip(sock, b"\x00bytes, any bytes\xff\n") == b"\x00bytes, any bytes\xff\n"
            memory = server.memory()
            assert memory is not None and memory.processes >= 1 and memory.pss_bytes > 0
        assert server.cpu() is not None
    finally:
        server.stop()
    assert server.proc is not None and server.proc.returncode is not None


def test_pyzmq_floor_echoes_frame_for_frame_and_stops() -> None:
    """The zmq model's floor: a DEALER's multipart message (empty, binary and
    long frames) comes back whole; a client that never reads has its replies
    dropped whole once the high-water mark is reached, the rest of each such
    message read and dropped, not taken for a new one (a frame naming another
    client's routing id must not reach that client); SIGTERM ends it with 0."""
    server = Server.start(BY_NAME["pyzmq"])
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    url = f"tcp://{server.host}:{server.port}"
    try:
        good = context.socket(zmq.DEALER)
        good.setsockopt(zmq.ROUTING_ID, b"good")
        good.connect(url)
        message = [b"", b"\x00\xff", b"x" * 70_000, b"end"]
        good.send_multipart(message)
        assert good.poll(10_000) and good.recv_multipart() == message
        flooder = context.socket(zmq.DEALER)  # never reads: its replies pass the floor's HWM of 1000
        flooder.setsockopt(zmq.RCVHWM, 1)
        flooder.setsockopt(zmq.RCVBUF, 4096)
        flooder.setsockopt(zmq.LINGER, 0)
        flooder.setsockopt(zmq.SNDTIMEO, 10_000)  # a server that stops reading fails the test, never hangs it
        flooder.connect(url)
        for _ in range(4000):
            flooder.send_multipart([b"", b"good", b"stolen" * 2000])
        time.sleep(2)  # the floor reads them all; past the HWM each reply is dropped
        good.send_multipart(message)
        assert good.poll(10_000) and good.recv_multipart() == message
        assert not good.poll(500), "a dropped message's frames reached another client"
    finally:
        context.destroy(linger=0)
        server.stop()
    assert server.proc is not None and server.proc.returncode == 0


def test_libzmq_proxy_reflects_each_message_to_its_sender_and_stops() -> None:
    """The reflector reference: libzmq's proxy, one ROUTER as both ends, sends each
    multipart message back whole to the client it came from, to each its own;
    SIGTERM ends it (TERMINATE to the proxy) with 0."""
    server = Server.start(BY_NAME["zmqproxy"])
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    url = f"tcp://{server.host}:{server.port}"
    try:
        clients = []
        for _ in range(3):
            client = context.socket(zmq.DEALER)
            client.connect(url)
            clients.append(client)
        for n, client in enumerate(clients):
            client.send_multipart([b"", bytes([n]) * (n * 40_000 + 1), b"\x00\xff"])
        for n, client in enumerate(clients):
            assert client.poll(10_000) and client.recv_multipart() == [b"", bytes([n]) * (n * 40_000 + 1), b"\x00\xff"]
            assert not client.poll(100)
        req = context.socket(zmq.REQ)  # the talk's client: REQ, through the envelope
        req.connect(url)
        req.send(b"hello")
        assert req.poll(10_000) and req.recv() == b"hello"
    finally:
        context.destroy(linger=0)
        server.stop()
    assert server.proc is not None and server.proc.returncode == 0


def test_every_model_says_how_it_starts_by_its_fields(tmp_path: Path) -> None:
    """One way to start per model, each giving a command line; no case by name."""
    for model in MODELS:
        ways = [bool(model.program), bool(model.serve), bool(model.pyserver), bool(model.inetd)]
        assert ways.count(True) == 1, model.name
        assert set(model.scenarios) <= set(SCENARIOS), model.name
        launch = launch_command(model, 12345, tmp_path)
        assert launch.argv, model.name
    broker = launch_command(BY_NAME["broker-4"], 12345, tmp_path).argv[-1]
    assert broker.count("serve worker") == 4 and "exec" in broker
    launch_command(BY_NAME["inetd-xinetd-cps50"], 12345, tmp_path)
    assert "cps" not in (tmp_path / "xinetd.conf").read_text()
    launch_command(BY_NAME["inetd-xinetd"], 12345, tmp_path)
    assert "cps         = 1000000 1" in (tmp_path / "xinetd.conf").read_text()


def test_cpu_of_exited_children_is_counted() -> None:
    """The fork-server case: children that burn CPU and exit still count."""
    import subprocess
    import sys

    burn = "import os, sys\nfor _ in range(3):\n    if os.fork() == 0:\n        sum(range(3_000_000)); os._exit(0)\n"
    burn += "for _ in range(3): os.wait()\nprint(flush=True)\ntime.sleep(30)\n"
    proc = subprocess.Popen([sys.executable, "-c", "import time\n" + burn], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the three children have been reaped
        assert procs.tree(proc.pid) == [proc.pid]
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        children = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
        assert children > 0  # the kernel credited the reaped children to the parent
        assert procs.cpu_seconds(procs.tree(proc.pid)) == pytest.approx(own + children, abs=0.02)
    finally:
        proc.kill()
        proc.wait()


def test_main_cpu_leaves_the_workers_out() -> None:
    """The broker case: a parent that idles beside a child that burns CPU
    (running, then reaped) costs little of its own; the tree costs the child's."""
    import subprocess
    import sys

    burn = "import os, time\nif os.fork() == 0:\n    while time.process_time() < 0.3:\n        pass\n    os._exit(0)\n"
    burn += "os.wait()\nprint(flush=True)\ntime.sleep(30)\n"
    proc = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        own = procs.own_cpu_seconds(proc.pid)
        tree = procs.cpu_seconds(procs.tree(proc.pid))
        assert own is not None
        assert tree - own >= 0.25  # the child's CPU, in the tree only
        assert own < 0.15
    finally:
        proc.kill()
        proc.wait()
    assert procs.own_cpu_seconds(proc.pid) is None  # gone


def test_listener_owner_finds_this_process() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        assert procs.listener_owner(listener.getsockname()[1]) == os.getpid()
    assert procs.fd_limit(os.getpid()) is None or procs.fd_limit(os.getpid()) > 0


@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="redis-benchmark (redis-tools) is not installed")
def test_check_loadgen_compares_with_redis_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    from myecho.bench.validate import check_loadgen

    status = check_loadgen(lambda message: None, rounds=1, duration=0.3)
    out = capsys.readouterr().out
    assert "redis-benchmark" in out and "ratio" in out
    assert "pyzmq REQ" in out and out.count("ratio") == 4  # TCP and ZeroMQ, 1 and 32 clients each
    assert status in (0, 1)  # one short round on a shared machine proves nothing either way


def test_zmq_limit_echoes_frame_for_frame_and_stops() -> None:
    """zmq-echo, the zmq models' C limit: REQ and DEALER clients get every
    frame back while a peer that does not speak ZMTP is connected; SIGTERM
    exits 0. It is built with the package (libzmq3-dev): a missing binary
    is a failure that says so, never a skip."""
    import zmq

    model = BY_NAME["zmq-c"]
    assert unavailable(model) is None, unavailable(model)
    server = Server.start(model)
    context = zmq.Context()
    try:
        garbage = socket.create_connection((server.host, server.port), timeout=10)
        garbage.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)))
        endpoint = f"tcp://{server.host}:{server.port}"
        req = context.socket(zmq.REQ)
        req.connect(endpoint)
        req.send(b"\x00line\r\n\xff")
        assert req.poll(10_000) and req.recv() == b"\x00line\r\n\xff"
        dealer = context.socket(zmq.DEALER)
        dealer.connect(endpoint)
        frames = [b"", b"one", b"", bytes(range(256)) * 300]
        dealer.send_multipart(frames)
        assert dealer.poll(10_000) and dealer.recv_multipart() == frames
        memory = server.memory()
        assert memory is not None and memory.processes == 1
        garbage.close()
    finally:
        context.destroy(linger=0)
        server.stop()
    assert server.proc is not None and server.proc.returncode == 0


@pytest.mark.parametrize("session", [False, True])
def test_harness_stop_kills_a_server_deaf_to_sigterm_and_its_children(session: bool) -> None:
    """Past the grace period, the server and every process it started are gone."""
    code = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "if os.fork() == 0:\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(flush=True)\n"
        "time.sleep(60)\n"
    )
    server = ServerProcess([sys.executable, "-c", code], notify=False, session=session, stdout=subprocess.PIPE)
    assert server.proc.stdout is not None
    server.proc.stdout.readline()  # the child is forked
    tree = procs.tree(server.pid)
    assert len(tree) == 2
    assert server.stop(grace=0.5) is None
    assert server.proc.returncode == -signal.SIGKILL
    for pid in tree[1:]:  # reaped by init once orphaned: gone, or a zombie for a moment
        for _ in range(100):
            if procs.state(pid) in (None, "Z"):
                break
            time.sleep(0.02)
        assert procs.state(pid) in (None, "Z")
