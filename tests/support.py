"""Test support: real server processes, real loopback clients.

Servers run as the installed commands (``myecho``, ``myecho-c``) in child
processes; readiness is read from a NOTIFY_SOCKET that the test binds, the
way systemd would, so every start also checks sd_notify.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the system suite's tox env has no pyzmq
    import zmq

BIN = Path(sys.executable).parent


def command(name: str) -> str:
    """An installed console script of this environment, or a clear failure."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed: run the tests through tox (see README)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NotifySocket:
    """A fake systemd: collects the sd_notify datagrams a service sends."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="myecho-notify-")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []
        self.arrived = threading.Condition()
        self.following = False
        self.cursor = 0  # when following: the next message receive() returns

    def follow(self) -> None:
        """Read every datagram as it comes, as systemd does, in a thread.

        A unix datagram socket queues only net.unix.max_dgram_qlen (10)
        messages: a service sending STATUS= every second to a test that
        stopped reading blocks in sendmsg after ten seconds. Long-lived
        test services need this."""
        self.following = True
        self.cursor = len(self.messages)
        threading.Thread(target=self._read_all, daemon=True).start()

    def _read_all(self) -> None:
        self.sock.settimeout(0.2)
        while self.following:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self.arrived:
                self.messages.append(message)
                self.arrived.notify_all()

    def receive(self, timeout: float) -> dict[str, str] | None:
        if self.following:
            with self.arrived:
                if not self.arrived.wait_for(lambda: self.cursor < len(self.messages), timeout):
                    return None
                self.cursor += 1
                return self.messages[self.cursor - 1]
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(message)
        return message

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10.0) -> dict[str, str]:
        for message in self.messages:
            if key in message and (value is None or message[key] == value):
                return message
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and key in message and (value is None or message[key] == value):
                return message
        raise AssertionError(f"no {key}={value or '*'} from the service in {timeout} s; got {self.messages}")

    def close(self) -> None:
        self.following = False
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Server:
    """A running server process on a loopback port."""

    def __init__(self, argv: list[str], port: int, env: dict[str, str] | None = None,
                 notify: bool = True, **popen: object) -> None:
        self.port = port
        self.host = "::1" if "::1" in argv else "127.0.0.1"
        self.notify = NotifySocket() if notify else None
        full_env = dict(os.environ, **(env or {}))
        if self.notify is not None:
            full_env["NOTIFY_SOCKET"] = self.notify.path
        self.proc = subprocess.Popen(argv, env=full_env, stderr=subprocess.PIPE, **popen)  # type: ignore[call-overload]
        self.stderr_lines: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.decode(errors="replace").rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def wait_ready(self, timeout: float = 10.0) -> Server:
        if self.notify is not None:
            self.notify.wait_for("READY", "1", timeout)
        else:
            wait_listening(self.port, timeout, self.proc, self.host)
        return self

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not stop within {timeout} s after SIGTERM") from None
        self._reader.join(2)
        return code  # the notify socket stays readable until kill()

    def kill(self) -> None:
        """Teardown after a failed test: the server and any child it left."""
        if self.proc.poll() is None:
            for child in descendants_of(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
        if self.notify is not None:
            self.notify.close()
            self.notify = None


def wait_listening(port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None,
                   host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before listening")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll for something another process does in its own time; what the predicate last said."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout} s")
        time.sleep(0.02)
    return result


def refused(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return True
    return False


def random_bytes(size: int, seed: int = 862) -> bytes:
    return random.Random(seed).randbytes(size)


def odd_chunks(data: bytes, seed: int = 11) -> Iterator[bytes]:
    """Cut data into chunks of awkward sizes (1 byte to ~100 KiB)."""
    rng = random.Random(seed)
    offset = 0
    while offset < len(data):
        size = rng.choice((1, 2, 3, 7, 511, 512, 513, 4095, 65537, 99991))
        yield data[offset:offset + size]
        offset += size


def exchange(sock: socket.socket, payload: bytes, chunks: Iterator[bytes] | None = None,
             half_close: bool = True) -> bytes:
    """Send payload (in chunks) while reading concurrently; return what came back.

    Sending and reading at once matters: an echo of 10 MiB cannot fit in
    the socket buffers, so a client that only reads after sending deadlocks.
    """
    received = bytearray()

    def reader() -> None:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return
            received.extend(data)
            if not half_close and len(received) >= len(payload):
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    for chunk in chunks if chunks is not None else [payload]:
        sock.sendall(chunk)
    if half_close:
        sock.shutdown(socket.SHUT_WR)
    thread.join(60)
    assert not thread.is_alive(), f"echo stalled after {len(received)} of {len(payload)} bytes"
    return bytes(received)


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    """Send a small payload and read exactly as many bytes back."""
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        data = sock.recv(len(payload) - len(received))
        if not data:
            break
        received += data
    return received


def descendants_of(pid: int) -> list[int]:
    """Children, their children and so on (the fork model's spawner has the spares)."""
    found: list[int] = []
    for child in children_of(pid):
        found += [child, *descendants_of(child)]
    return found


def children_of(pid: int) -> list[int]:
    """Direct children, from /proc (no psutil needed)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(child) for child in text.split()]


def zombies_of(pid: int) -> list[int]:
    result = []
    for child in children_of(pid):
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state == "Z":
            result.append(child)
    return result


def rss_kib(pid: int) -> int:
    """Resident memory of one process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def limit_fds_to_128() -> None:
    """``preexec_fn`` for a server that must reach its fd limit quickly."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))


def assert_pauses_at_the_fd_limit(server: Server, port: int) -> None:
    """150 idle TCP connections to ``port`` (more than a server limited to
    128 descriptors can hold; never a byte sent): it must say "accepting
    paused" and spend under 0.3 s of CPU in 2 s (not retry a failed
    accept() at once, for ever). The connections are closed on return."""
    raw: list[socket.socket] = []
    try:
        for number in range(150):
            if number % 8 == 0:
                time.sleep(0.02)  # in waves the backlog of 16 takes
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
            raw.append(sock)
        with contextlib.suppress(AssertionError):  # checked below, after the CPU
            wait_until(lambda: "accepting paused" in server.stderr, timeout=8, what="accepting paused")
        time.sleep(0.5)
        cpu_before = cpu_seconds(server.proc.pid)
        time.sleep(2)
        spent = cpu_seconds(server.proc.pid) - cpu_before
        assert spent < 0.3, f"the server spun for {spent:.2f} s of CPU at the fd limit"
        assert server.proc.poll() is None
        assert "accepting paused" in server.stderr
    finally:
        for sock in raw:
            sock.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_status(server: Server, needle: str, timeout: float = 10.0) -> str:
    """Wait for a STATUS= line, sent from now on, that contains ``needle``."""
    assert server.notify is not None
    if server.notify.following:
        server.notify.cursor = len(server.notify.messages)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = server.notify.receive(min(left, 1.0))
        if message is not None and needle in message.get("STATUS", ""):
            return message["STATUS"]
        if server.proc.poll() is not None:
            break
    raise AssertionError(f"no STATUS with {needle!r} in {timeout} s; stderr:\n{server.stderr}")


def req(ctx: zmq.Context[zmq.Socket[bytes]], url: str) -> zmq.Socket[bytes]:
    """A REQ client, as the talk's: no linger, and a 10 s receive timeout so
    that a missing answer fails the test instead of hanging it."""
    import zmq

    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(url)
    return sock
