"""CURVE on the broker's backend: keygen's files, who gets in, the refusals.

Real ``myecho serve broker`` and ``myecho serve worker`` processes on
loopback; the rogues are pyzmq DEALER sockets speaking the worker protocol
by hand, with a monitor to see how their handshake ended.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
import zmq.auth
from support import Server, command, req, wait_until
from zmq.utils.monitor import recv_monitor_message

from myecho.bench.harness import free_port
from myecho.models import mew

Context = zmq.Context[zmq.Socket[bytes]]
BEATS = ["--heartbeat", "0.2", "--liveness", "3"]
FEW_HEARTBEATS = 1.0  # seconds: five heartbeat intervals
HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
}


def keygen(directory: Path, name: str, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    def set_umask() -> None:
        if umask is not None:
            os.umask(umask)

    return subprocess.run(
        [command("myecho"), "keygen", str(directory), name],
        capture_output=True,
        text=True,
        timeout=20,
        preexec_fn=set_umask,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("myecho"), result.stderr
    return lines[0]


# -- keygen -----------------------------------------------------------------------
def test_keygen_writes_a_pair_that_pyzmq_loads(tmp_path: Path) -> None:
    result = keygen(tmp_path, "broker", umask=0)  # no umask to help: the mode must come from keygen
    assert result.returncode == 0, result.stderr
    public, secret = tmp_path / "broker.key", tmp_path / "broker.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    public_key, none = zmq.auth.load_certificate(public)
    assert none is None
    same_public, secret_key = zmq.auth.load_certificate(secret)
    assert same_public == public_key and secret_key is not None
    assert zmq.curve_public(secret_key) == public_key


def test_keygen_never_overwrites_nor_follows_a_symlink(tmp_path: Path) -> None:
    assert keygen(tmp_path, "w1").returncode == 0
    before = (tmp_path / "w1.key_secret").read_bytes(), (tmp_path / "w1.key").read_bytes()
    assert "not overwritten" in one_line_error(keygen(tmp_path, "w1"))
    assert ((tmp_path / "w1.key_secret").read_bytes(), (tmp_path / "w1.key").read_bytes()) == before

    (tmp_path / "w1.key").unlink()  # the secret alone still blocks a new pair
    assert "w1.key_secret" in one_line_error(keygen(tmp_path, "w1"))
    assert not (tmp_path / "w1.key").exists()

    target = tmp_path / "elsewhere"
    (tmp_path / "trap.key_secret").symlink_to(target)
    assert "symlink" in one_line_error(keygen(tmp_path, "trap"))
    assert not target.exists() and not (tmp_path / "trap.key").exists()


def test_keygen_has_help() -> None:
    result = subprocess.run([command("myecho"), "keygen", "--help"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0 and "NAME.key_secret" in result.stdout


def test_keygen_needs_an_existing_folder(tmp_path: Path) -> None:
    assert "does not exist" in one_line_error(keygen(tmp_path / "missing", "w1"))
    assert not (tmp_path / "missing").exists()
    assert "usable name" in one_line_error(keygen(tmp_path, "../w1"))


# -- who gets in ------------------------------------------------------------------
@dataclass
class Keys:
    dir: Path
    allow: Path

    def secret(self, name: str) -> Path:
        return self.dir / f"{name}.key_secret"

    def public(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def pair(self, name: str) -> tuple[bytes, bytes]:
        public, secret = zmq.auth.load_certificate(self.secret(name))
        assert secret is not None
        return public, secret


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    made = Keys(tmp_path_factory.mktemp("curve"), tmp_path_factory.mktemp("allow"))
    for name in ("broker", "w1", "rogue"):
        assert keygen(made.dir, name).returncode == 0
    (made.allow / "w1.key").write_bytes(made.public("w1").read_bytes())
    return made


@dataclass
class Cluster:
    broker: Server
    worker: Server
    front: str
    back: str


@pytest.fixture(scope="module")
def cluster(keys: Keys) -> Iterator[Cluster]:
    front, back = free_port(), free_port()
    backend = f"tcp://127.0.0.1:{back}"
    started: list[Server] = []
    try:
        broker = Server(
            [
                command("myecho"),
                "serve",
                "broker",
                "--port",
                str(front),
                "--backend",
                backend,
                *BEATS,
                "--curve-secret",
                str(keys.secret("broker")),
                "--curve-allow",
                str(keys.allow),
            ],
            front,
        )
        started.append(broker)
        assert broker.notify is not None
        broker.notify.follow()
        broker.wait_ready()
        worker = Server(
            [
                command("myecho"),
                "serve",
                "worker",
                "--connect",
                backend,
                *BEATS,
                "--curve-secret",
                str(keys.secret("w1")),
                "--curve-server",
                str(keys.public("broker")),
            ],
            0,
        )
        started.append(worker)
        assert worker.notify is not None
        worker.notify.follow()
        worker.wait_ready()
        yield Cluster(broker, worker, f"tcp://127.0.0.1:{front}", backend)
    finally:
        for server in reversed(started):
            with contextlib.suppress(AssertionError):
                server.stop(timeout=10)
            server.kill()


def test_an_allowed_worker_echoes(cluster: Cluster, context: Context) -> None:
    client = req(context, cluster.front)
    for number in range(20):
        payload = b"curve %d" % number
        client.send(payload)
        assert client.recv() == payload


def rogue(
    context: Context, url: str, curve: tuple[bytes, bytes, bytes] | None
) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    """A DEALER that says READY as a worker would, and a monitor of its handshake."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        public, secret, server = curve
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server
    monitor = sock.get_monitor_socket()
    sock.connect(url)
    sock.send(mew.READY + b"1")  # MEW2 READY with a window of one
    return sock, monitor


def handshake_events(monitor: zmq.Socket[bytes]) -> set[int]:
    seen = set()
    while monitor.poll(0):
        seen.add(recv_monitor_message(monitor)["event"])
    return seen


def gets_nothing_while_clients_are_served(cluster: Cluster, context: Context, sock: zmq.Socket[bytes]) -> None:
    """Nothing at all reaches ``sock``, not even a heartbeat, while a client is served."""
    client = req(context, cluster.front)
    for number in range(10):
        client.send(b"%d" % number)
        assert client.recv() == b"%d" % number
    assert not sock.poll(int(FEW_HEARTBEATS * 1000)), sock.recv_multipart()


def test_a_plain_peer_gets_nothing(cluster: Cluster, context: Context) -> None:
    sock, monitor = rogue(context, cluster.back, curve=None)
    gets_nothing_while_clients_are_served(cluster, context, sock)
    events = handshake_events(monitor)
    assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events
    assert events & HANDSHAKE_FAILED  # NULL against a CURVE server: the server stops the handshake


def test_an_unknown_key_gets_nothing(cluster: Cluster, keys: Keys, context: Context) -> None:
    public, secret = keys.pair("rogue")
    broker_public, _ = zmq.auth.load_certificate(keys.public("broker"))
    sock, monitor = rogue(context, cluster.back, curve=(public, secret, broker_public))
    gets_nothing_while_clients_are_served(cluster, context, sock)
    events = handshake_events(monitor)
    assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events
    assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in events  # ZAP said no
    wait_until(lambda: public.decode() in cluster.broker.stderr, what="the refusal logged")
    assert "unknown CURVE key" in cluster.broker.stderr


def test_the_right_key_for_the_wrong_broker_gets_nothing(cluster: Cluster, keys: Keys, context: Context) -> None:
    """An allowed key that trusts another server key: the client side stops the handshake."""
    public, secret = keys.pair("w1")
    other, _ = zmq.auth.load_certificate(keys.public("rogue"))
    sock, monitor = rogue(context, cluster.back, curve=(public, secret, other))
    gets_nothing_while_clients_are_served(cluster, context, sock)
    events = handshake_events(monitor)
    assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events
    assert events & HANDSHAKE_FAILED


# -- refusals -----------------------------------------------------------------------
def serve(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([command("myecho"), "serve", *argv], capture_output=True, text=True, timeout=20)


@pytest.fixture
def broken(keys: Keys, tmp_path: Path) -> Path:
    """Files that are not what they claim to be."""
    (tmp_path / "garbage").write_bytes(b"\x00\xffnot a certificate\n")
    (tmp_path / "short.key_secret").write_text('curve\n    public-key = "abc"\n    secret-key = "def"\n')
    (tmp_path / "link").symlink_to(keys.public("broker"))  # a public file behind a secret-looking name
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "w1.key").write_bytes(keys.public("w1").read_bytes())
    (allow / "bad.key").write_text("hello\n")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--curve-secret", "{keys}/broker.key_secret"], "--curve-secret (MYECHO_CURVE_SECRET) without --curve-allow"),
        (["--curve-allow", "{allow}"], "--curve-allow (MYECHO_CURVE_ALLOW) without --curve-secret"),
        (["--curve-secret", "{keys}/broker.key_secret", "--curve-allow", "{tmp}/nowhere"], "does not exist"),
        (["--curve-secret", "{keys}/broker.key", "--curve-allow", "{allow}"], "is a public certificate"),
        (["--curve-secret", "{tmp}/garbage", "--curve-allow", "{allow}"], "is not a CURVE certificate"),
        (["--curve-secret", "{tmp}/short.key_secret", "--curve-allow", "{allow}"], "is not a CURVE certificate"),
        (["--curve-secret", "{tmp}/link", "--curve-allow", "{allow}"], "broker.key) is a public certificate"),
        (["--curve-secret", "{tmp}/missing.key_secret", "--curve-allow", "{allow}"], "cannot read"),
        (["--curve-secret", "{keys}/broker.key_secret", "--curve-allow", "{tmp}/allow"], "bad.key is not a CURVE"),
        (["--backend", "tcp://0.0.0.0:{port}"], "reachable from other hosts and has no CURVE"),
        (["--host", "0.0.0.0", "--port", "{port}"], "reachable from other hosts and has no CURVE"),
    ],
    ids=lambda value: value if isinstance(value, str) else " ".join(value),
)
def test_the_broker_refuses_with_one_line(keys: Keys, broken: Path, args: list[str], said: str) -> None:
    port = str(free_port())
    argv = [arg.format(keys=keys.dir, allow=keys.allow, tmp=broken, port=port) for arg in args]
    assert said in one_line_error(serve("broker", "--port", str(free_port()), *argv))


def test_insecure_lets_a_plain_backend_beyond_loopback_with_a_warning() -> None:
    """Past the check, the bind itself fails here (192.0.2.1 is not ours): nothing listens beyond loopback."""
    result = serve("broker", "--port", str(free_port()), "--backend", f"tcp://192.0.2.1:{free_port()}", "--insecure")
    assert result.returncode == 1
    warning, error = result.stderr.strip().splitlines()
    assert "without CURVE (--insecure): anyone who reaches it is a worker" in warning
    assert error.startswith("myecho: cannot bind tcp://192.0.2.1:")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--curve-secret", "{keys}/w1.key_secret"], "--curve-secret (MYECHO_CURVE_SECRET) without --curve-server"),
        (["--curve-server", "{keys}/broker.key"], "--curve-server (MYECHO_CURVE_SERVER) without --curve-secret"),
        (
            ["--curve-secret", "{keys}/w1.key_secret", "--curve-server", "{keys}/broker.key_secret"],
            "holds a secret key",
        ),
        (["--curve-secret", "{keys}/w1.key", "--curve-server", "{keys}/broker.key"], "is a public certificate"),
        (["--curve-secret", "{tmp}/garbage", "--curve-server", "{keys}/broker.key"], "is not a CURVE certificate"),
        (["--curve-secret", "{keys}/w1.key_secret", "--curve-server", "{tmp}/missing.key"], "cannot read"),
    ],
    ids=lambda value: value if isinstance(value, str) else " ".join(value),
)
def test_the_worker_refuses_with_one_line(keys: Keys, broken: Path, args: list[str], said: str) -> None:
    argv = [arg.format(keys=keys.dir, tmp=broken) for arg in args]
    connect = f"tcp://127.0.0.1:{free_port()}"
    assert said in one_line_error(serve("worker", "--connect", connect, *argv))


def test_a_curve_broker_stops_at_once(keys: Keys) -> None:
    """The ZAP thread must not keep the process alive after the broker's last line."""
    front = free_port()
    argv = [command("myecho"), "serve", "broker", "--port", str(front), "--backend", f"tcp://127.0.0.1:{free_port()}"]
    curve = ["--curve-secret", str(keys.secret("broker")), "--curve-allow", str(keys.allow)]
    broker = Server([*argv, *curve, "--graceful-timeout", "0.5"], front).wait_ready()
    try:
        started = time.monotonic()
        assert broker.stop(timeout=5) == 0
        assert time.monotonic() - started < 3
    finally:
        broker.kill()


def test_settings_come_from_the_config_file_too(keys: Keys, tmp_path: Path) -> None:
    config = tmp_path / "default"
    config.write_text(f"MYECHO_CURVE_SECRET={keys.secret('broker')}\n")
    said = one_line_error(serve("broker", "--port", str(free_port()), "--config", str(config)))
    assert "without --curve-allow (MYECHO_CURVE_ALLOW)" in said
    config.write_text(f"MYECHO_INSECURE=1\nMYECHO_BROKER_BACKEND=tcp://192.0.2.1:{free_port()}\n")
    result = serve("broker", "--port", str(free_port()), "--config", str(config))
    assert "without CURVE (--insecure)" in result.stderr and "cannot bind tcp://192.0.2.1" in result.stderr


def wait_event(monitor: zmq.Socket[bytes], wanted: set[int], timeout: float = 5.0) -> int:
    """The first of ``wanted`` among the monitor's events."""
    deadline = time.monotonic() + timeout
    while monitor.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        event = int(recv_monitor_message(monitor)["event"])
        if event in wanted:
            return event
    raise AssertionError(f"none of {wanted} within {timeout} s")


def test_the_allow_folder_counts_from_the_next_handshake(keys: Keys, tmp_path: Path, context: Context) -> None:
    """A key copied in admits its worker at once, a key removed refuses it: no restart, no signal."""
    allow = tmp_path / "allow"
    allow.mkdir()
    front, backend = free_port(), f"tcp://127.0.0.1:{free_port()}"
    argv = [command("myecho"), "serve", "broker", "--port", str(front), "--backend", backend, *BEATS]
    curve = ["--curve-secret", str(keys.secret("broker")), "--curve-allow", str(allow)]
    broker = Server([*argv, *curve], front).wait_ready()
    public, secret = keys.pair("w1")
    broker_public, _ = zmq.auth.load_certificate(keys.public("broker"))
    settled = {zmq.EVENT_HANDSHAKE_SUCCEEDED, *HANDSHAKE_FAILED}
    kept = []  # every socket alive to the end: a monitor's inproc name comes from its socket's id()
    try:
        assert "no worker key: no worker can join" in wait_until(lambda: broker.stderr, what="the start line")
        sock, monitor = rogue(context, backend, curve=(public, secret, broker_public))
        kept.append(sock)
        assert wait_event(monitor, settled) == zmq.EVENT_HANDSHAKE_FAILED_AUTH

        (allow / "w1.key").write_bytes(keys.public("w1").read_bytes())
        sock, monitor = rogue(context, backend, curve=(public, secret, broker_public))
        kept.append(sock)
        assert wait_event(monitor, settled) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert sock.poll(2000)  # a heartbeat: it is a worker now

        (allow / "w1.key").unlink()
        sock, monitor = rogue(context, backend, curve=(public, secret, broker_public))
        kept.append(sock)
        assert wait_event(monitor, settled) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        assert not sock.poll(int(FEW_HEARTBEATS * 1000))
        assert "CURVE allow folder changed: now 1 worker key (w1.key)" in broker.stderr
    finally:
        broker.stop()
        broker.kill()
