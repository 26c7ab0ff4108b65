"""Test support: real server processes, real loopback clients.

Servers run as the installed commands (``myecho``, ``myecho-c``) in child
processes, through the package's own harness (``myecho.bench.harness``):
readiness is read from a NOTIFY_SOCKET that the test binds, the way
systemd would, so every start also checks sd_notify.
"""

from __future__ import annotations

import contextlib
import random
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from myecho.bench import harness, procs
from myecho.bench.harness import ServerError, ServerProcess

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


class Server(ServerProcess):
    """A running server process on a loopback port; its stderr kept in ``stderr_lines``."""

    def __init__(
        self, argv: list[str], port: int, env: dict[str, str] | None = None, notify: bool = True, **popen: object
    ) -> None:
        self.port = port
        self.host = "::1" if "::1" in argv else "127.0.0.1"
        super().__init__(argv, env=env, notify=notify, stderr=subprocess.PIPE, **popen)
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

    def wait_ready(self, timeout: float = 10.0, host: str = "", port: int | None = None) -> Server:
        """Ready; from then on its notify socket is read as it comes, as systemd reads it.

        Unread, the socket holds ten datagrams (net.unix.max_dgram_qlen):
        a server that says STATUS= every second would then block in sendmsg
        ten seconds in, and stop serving in the middle of a long test."""
        super().wait_ready(timeout, self.host, self.port)
        if self.notify is not None:
            self.notify.follow()
        return self

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def stop(self, timeout: float = 15.0) -> int:  # type: ignore[override]
        code = super().stop(timeout)
        if code is None:
            raise AssertionError(f"server did not stop within {timeout} s after SIGTERM")
        self._reader.join(2)
        return code  # the notify socket stays readable until kill()

    def kill(self) -> None:
        """Teardown after a failed test: the server and any child it left."""
        super().kill()
        self.close()


#: The byte-stream models, and the C reference held to the same contract.
#: "fork-classic" is the fork model as the talk wrote it: the parent forks
#: after accept (--spare-children 0) instead of handing over to a spare.
#: "asyncio" runs on uvloop (installed by the test extras), "asyncio-asyncio"
#: on asyncio's own loop; "select-2-workers" is select with --workers 2.
STREAM_MODELS = ("fork", "fork-classic", "select", "asyncio", "asyncio-asyncio", "select-2-workers", "c")

ServeFactory = Callable[..., "Server"]


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


def wait_listening(
    port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None, host: str = "127.0.0.1"
) -> None:
    harness.wait_listening(host, port, timeout, proc)


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
        yield data[offset : offset + size]
        offset += size


def exchange(
    sock: socket.socket, payload: bytes, chunks: Iterator[bytes] | None = None, half_close: bool = True
) -> bytes:
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
    return procs.tree(pid)[1:]


def stall_report(pid: int, port: int) -> str:
    """What a server that stopped answering is doing: its state, where the kernel
    has it waiting, its descriptors, its listener's queue and its established
    connections (for a failure message: a stall seen once in CI must say why)."""
    proc = Path(f"/proc/{pid}")

    def read(name: str) -> str:
        try:
            return (proc / name).read_text().strip()
        except OSError as error:
            return f"({error.strerror})"

    status = dict(line.split(":\t", 1) for line in read("status").splitlines() if ":\t" in line)
    try:
        fds = str(len(list((proc / "fd").iterdir())))
    except OSError:
        fds = "?"
    ss = shutil.which("ss")
    listen = established = "?"
    if ss:
        listen = subprocess.run([ss, "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout.strip()
        lines = subprocess.run([ss, "-Htn", "state", "established", f"sport = :{port}"], capture_output=True, text=True)
        established = str(len(lines.stdout.splitlines()))
    stack = " < ".join(line.split()[-1] for line in read("stack").splitlines()[:6])
    return (
        f"server {pid}: state {status.get('State', '?')}, threads {status.get('Threads', '?')}, waiting in "
        f"{read('wchan')} ({stack}), {fds} descriptors; listener {listen!r}; {established} established"
    )


def children_of(pid: int) -> list[int]:
    return procs.children(pid)


def zombies_of(pid: int) -> list[int]:
    return [child for child in procs.children(pid) if procs.state(child) == "Z"]


def rss_kib(pid: int) -> int:
    """Resident memory of one process, in KiB."""
    return procs.memory([pid]).rss_bytes // 1024


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
    return procs.cpu_seconds([pid])


def wait_status(server: Server, needle: str, timeout: float = 10.0) -> str:
    """Wait for a STATUS= line, sent from now on, that contains ``needle``."""
    assert server.notify is not None
    try:
        return server.notify.wait_status(needle, timeout, server.proc)
    except ServerError as error:
        raise AssertionError(f"{error}; stderr:\n{server.stderr}") from None


def req(ctx: zmq.Context[zmq.Socket[bytes]], url: str) -> zmq.Socket[bytes]:
    """A REQ client, as the talk's: no linger, and a 10 s receive timeout so
    that a missing answer fails the test instead of hanging it."""
    import zmq

    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(url)
    return sock
