"""Servers as real child processes, watched as systemd would watch them.

The benchmark tool, the broker's measurements (``bench.measure``) and the
test suite all do the same things to a server: pick a free loopback port,
start it with a fake systemd notify socket and wait for READY=1 (or, for a
server that does not speak sd_notify, for a TCP connect), read its STATUS=
lines, stop it with SIGTERM and, past a grace period, SIGKILL what is left
of its process tree. This module does them once; the /proc readers of the
tree are in ``bench.procs``.

It lives under ``bench`` rather than ``core`` because no daemon runs it:
``core`` is what a model is handed, this is what stands outside a model
and watches it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from myecho.bench import procs
from myecho.core.sockets import free_port

__all__ = ["NotifySocket", "ServerError", "ServerProcess", "free_port", "server_env", "wait_listening"]

#: What systemd hands a service and a child must not inherit from whoever started it.
SYSTEMD_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")


class ServerError(RuntimeError):
    """A server that would not start or stop; the message says why."""

    def __init__(self, message: str, early: bool = False) -> None:
        super().__init__(message)
        self.early = early  # it exited by itself (a port taken meanwhile?): worth another try


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without systemd's variables, plus ``extra``."""
    env = {name: value for name, value in os.environ.items() if name not in SYSTEMD_VARIABLES}
    env.update(extra or {})
    return env


def _parse(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode(errors="replace").splitlines() if "=" in line)


class NotifySocket:
    """A fake systemd: the notify socket a service sends its sd_notify datagrams to.

    In ``directory`` (kept), or in a temporary folder of its own (removed by
    ``close``). Every message read is kept in ``messages``, as a dict.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self._own_dir = directory is None
        self.dir = str(directory) if directory is not None else tempfile.mkdtemp(prefix="myecho-notify-")
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
        messages: a service sending STATUS= every second to a reader that
        stopped reading blocks in sendmsg after ten seconds. Long-lived
        services need this. ``receive`` returns the messages from now on
        (called again: from then on; one reader thread all along)."""
        with self.arrived:
            self.cursor = len(self.messages)
        if not self.following:
            self.following = True
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
            with self.arrived:
                self.messages.append(_parse(data))
                self.arrived.notify_all()

    def receive(self, timeout: float) -> dict[str, str] | None:
        """The next message, or None after ``timeout`` seconds."""
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
        message = _parse(data)
        self.messages.append(message)
        return message

    def status(self) -> str:
        """The last STATUS= line received ("" before the first)."""
        return next((m["STATUS"] for m in reversed(self.messages) if "STATUS" in m), "")

    def wait_for(
        self, key: str, value: str | None = None, timeout: float = 10.0, proc: subprocess.Popen[Any] | None = None
    ) -> dict[str, str]:
        """The first message, received before or within ``timeout``, with
        ``key`` (equal to ``value`` if given); stops early when ``proc`` exits."""
        for seen in self.messages:
            if key in seen and (value is None or seen[key] == value):
                return seen
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if proc is not None and proc.poll() is not None:
                raise ServerError(f"exited with status {proc.returncode} before {key}={value or '*'}", early=True)
            message = self.receive(min(left, 0.2) if proc is not None else left)
            if message is not None and key in message and (value is None or message[key] == value):
                return message
        raise ServerError(f"no {key}={value or '*'} from the service in {timeout} s; got {self.messages}")

    def wait_status(self, needle: str, timeout: float = 10.0, proc: subprocess.Popen[Any] | None = None) -> str:
        """The first STATUS= line sent from now on that contains ``needle``."""
        if self.following:
            self.cursor = len(self.messages)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(min(left, 1.0))
            if message is not None and needle in message.get("STATUS", ""):
                return message["STATUS"]
            if proc is not None and proc.poll() is not None:
                break
        raise ServerError(f"no STATUS with {needle!r} in {timeout} s (last: {self.status()!r})")

    def close(self) -> None:
        self.following = False
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def wait_listening(host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Until a TCP connect to host:port succeeds; ServerError if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"exited with status {proc.returncode} before listening", early=True)
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), timeout=1).close()
            return
        time.sleep(0.02)
    raise ServerError(f"nothing listens on {host}:{port} after {timeout} s")


class ServerProcess:
    """A server started here: its process, its notify socket, its stop.

    ``session``: in a session (and process group) of its own, so that
    ``stop`` and ``kill`` reach every process it started, even those that
    left its tree; otherwise they walk its tree in /proc.
    """

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        notify: bool = True,
        notify_dir: str | Path | None = None,
        session: bool = False,
        **popen: Any,
    ) -> None:
        self.notify = NotifySocket(notify_dir) if notify else None
        full_env = server_env(env)
        if self.notify is not None:
            full_env["NOTIFY_SOCKET"] = self.notify.path
        self.session = session
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                argv, env=full_env, start_new_session=session, **popen
            )
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 10.0, host: str = "127.0.0.1", port: int | None = None) -> None:
        """READY=1 on the notify socket, else (no notify socket) a TCP connect to host:port."""
        if self.notify is not None:
            self.notify.wait_for("READY", "1", timeout, self.proc)
        elif port is not None:
            wait_listening(host, port, timeout, self.proc)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the server, if it has not been reaped yet."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def stop(self, grace: float) -> int | None:
        """SIGTERM (after SIGCONT: it may be stopped), then ``grace`` seconds;
        its exit status, or None when it had to be killed."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        if self.session:  # not reaped before its group is killed: the group id cannot be reused meanwhile
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and not _exited(self.proc.pid):
                time.sleep(0.02)
            in_time = _exited(self.proc.pid)
            self.kill()
            return self.proc.returncode if in_time else None
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL for the server and every process it left, then reap it."""
        if self.session:
            if self.proc.returncode is None:  # once reaped, its group id may belong to someone else
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
        elif self.proc.poll() is None:
            for pid in procs.tree(self.proc.pid)[1:]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """The notify socket goes (readable until then, after the server exits too)."""
        if self.notify is not None:
            self.notify.close()
            self.notify = None


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it (WNOWAIT)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True
