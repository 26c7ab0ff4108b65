"""The models under test: how to start each on a free loopback port, how
to know it is ready, how to stop it, and how to find its processes.

Each measurement gets a fresh server, so one scenario's leftovers (a ramp
that exhausted something, a deactivated xinetd service) never colour the
next. Readiness comes from sd_notify READY=1 where the server sends it
(the Python models, like under systemd), otherwise from a TCP connect.
"""

from __future__ import annotations

import contextlib
import getpass
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from myecho import reference
from myecho.bench import procs
from myecho.settings import DEFAULT_PORTS

#: The packaged units' ports for ``--installed``; inetd by systemd is 11143.
INSTALLED_PORTS = {
    "c": DEFAULT_PORTS["c"],
    "inetd-xinetd": DEFAULT_PORTS["inetd"],
    "inetd-systemd": 11143,
    "fork": DEFAULT_PORTS["fork"],
    "select": DEFAULT_PORTS["select"],
    "aio": DEFAULT_PORTS["asyncio"],
    "zmq": DEFAULT_PORTS["zmq"],
    "broker": DEFAULT_PORTS["broker"],
}
#: Workers the bench starts behind its broker: one per core of this kind of machine.
BROKER_WORKERS = 2


@dataclass(frozen=True)
class Model:
    """One row of the tables."""

    name: str
    label: str
    protocol: str  # "tcp" or "zmq"
    description: str
    reference: bool = False  # measured to compare against, not one of myecho's models


MODELS = (
    Model("c", "C (myecho-c)", "tcp", "the talk's C echo, fork per connection, corrected: the reference", True),
    Model("epoll", "C epoll (limit)", "tcp", "a minimal single-threaded C epoll echo: the limit", True),
    Model(
        "zmq-c",
        "C libzmq (limit)",
        "zmq",
        "a minimal C ROUTER echo on libzmq, set up as the zmq model: the limit of the zmq models",
        True,
    ),
    Model(
        "inetd-xinetd",
        "inetd by xinetd",
        "tcp",
        "the inetd model (python3 -I -S inetd.py) under a private xinetd, cps lifted",
    ),
    Model(
        "inetd-xinetd-cps50",
        "inetd by xinetd, cps 50",
        "tcp",
        "the same with xinetd's default rate limit (cps = 50 10): the talk's '< 120'",
    ),
    Model(
        "inetd-systemd",
        "inetd by systemd",
        "tcp",
        "the inetd model behind systemd-socket-activate --inetd -a (Accept=yes); --installed: "
        "myecho-inetd.socket and its sandboxed unit per connection, as shipped",
    ),
    Model("fork", "fork", "tcp", "myecho serve fork: one child per connection, forked ahead by the spawner"),
    Model(
        "fork-classic",
        "fork, after accept",
        "tcp",
        "myecho serve fork --spare-children 0: the talk's shape, a fork between accept and the first echo",
    ),
    Model("select", "select", "tcp", "myecho serve select: one process, one epoll loop"),
    Model(
        "select-2",
        "select, 2 workers",
        "tcp",
        "myecho serve select --workers 2: two epoll loops, each a process, on one listening socket",
    ),
    Model(
        "aio",
        "asyncio model",
        "tcp",
        "myecho serve asyncio: asyncio.Protocol with myecho's shared layer, on uvloop when installed",
    ),
    Model("zmq", "zmq", "zmq", "myecho serve zmq: ROUTER socket, measured with REQ clients"),
    Model("broker-1", "zmq broker, 1 worker", "zmq", "myecho serve broker with 1 myecho serve worker behind it"),
    Model(
        "broker",
        "zmq broker, 2 workers",
        "zmq",
        "myecho serve broker (REQ clients on the frontend) with 2 myecho serve worker behind it",
    ),
    Model("broker-4", "zmq broker, 4 workers", "zmq", "myecho serve broker with 4 myecho serve worker behind it"),
    Model("asyncio", "Python asyncio", "tcp", "asyncio.Protocol echo on the standard loop", True),
    Model("uvloop", "Python uvloop", "tcp", "asyncio.Protocol echo on uvloop", True),
)
BY_NAME = {model.name: model for model in MODELS}
#: The references that are C programs of the package: model -> program.
C_PROGRAMS = {"c": "myecho-c", "epoll": "epoll-echo", "zmq-c": "zmq-echo"}

XINETD_SERVICE = """\
service myecho-bench
{{
    type        = UNLISTED
    id          = myecho-bench
    socket_type = stream
    protocol    = tcp
    wait        = no
    user        = {user}
    bind        = 127.0.0.1
    port        = {port}
    server      = {server}
    server_args = {server_args}
{limits}}}
"""
#: Lifted limits: what is measured is the model, not xinetd's rate limiting.
XINETD_LIFTED = "    cps         = 1000000 1\n    instances   = UNLIMITED\n    per_source  = UNLIMITED\n"


def program(name: str) -> Path:
    """A compiled program of the package (myecho-c, epoll-echo, zmq-echo, myecho-load).

    Beside the imported package first; when that is a source tree without
    the compiled programs (tests run from a checkout), the installed one.
    """
    path = reference.program(name)
    if path.exists():
        return path
    for entry in sys.path:
        installed = Path(entry or ".") / "myecho" / "_bin" / name
        if installed.exists():
            return installed
    return path


def myecho_command(name: str = "myecho") -> str:
    """A console script of the running environment (the venv's, else PATH's)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name) or name


def inetd_command() -> list[str]:
    """How the packaged xinetd file and myecho-inetd@.service start the inetd
    model: the module file itself under ``python3 -I -S`` (no site
    processing), the fastest start-up, which is every connection's delay."""
    import myecho.models.inetd

    return [sys.executable, "-I", "-S", str(Path(myecho.models.inetd.__file__).resolve())]


def xinetd_path() -> str | None:
    return shutil.which("xinetd") or ("/usr/sbin/xinetd" if os.path.exists("/usr/sbin/xinetd") else None)


def unavailable(model: Model) -> str | None:
    """Why this model cannot be measured here, or None if it can."""
    if model.name in C_PROGRAMS:
        binary = program(C_PROGRAMS[model.name])
        if binary.exists():
            return None
        if model.name == "zmq-c":
            return f"{binary} was not built (no libzmq3-dev at install: apt-get install libzmq3-dev, reinstall)"
        return f"{binary} was not built (no C compiler at install?)"
    if model.name.startswith("inetd-xinetd"):
        return None if xinetd_path() else "xinetd is not installed (apt-get install xinetd)"
    if model.name == "inetd-systemd":
        return None if shutil.which("systemd-socket-activate") else "systemd-socket-activate is missing"
    if model.name == "uvloop":
        return None if importlib.util.find_spec("uvloop") else "uvloop is not installed (pip install uvloop)"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class NotifySocket:
    """A stand-in for systemd's notify socket: READY=1 says the server listens."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def wait_ready(self, timeout: float, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if proc.poll() is not None:
                raise ServerError(f"exited with status {proc.returncode} before it was ready")
            self.sock.settimeout(min(left, 0.2))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in data.split(b"\n"):
                return
        raise ServerError(f"no READY=1 within {timeout} s")

    def close(self) -> None:
        self.sock.close()


class ServerError(RuntimeError):
    """A server that would not start; the message says why."""

    def __init__(self, message: str, early: bool = False) -> None:
        super().__init__(message)
        self.early = early  # it exited by itself (a port taken meanwhile?): worth another try


def wait_listening(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), timeout=1).close()
            return
        time.sleep(0.02)
    raise ServerError(f"nothing listens on {host}:{port} after {timeout} s")


@dataclass
class Launch:
    argv: list[str]
    notify: bool


def launch_command(model: Model, port: int, workdir: Path) -> Launch:
    """The command line that runs ``model`` on 127.0.0.1:``port``."""
    myecho = myecho_command()
    python_model = ["--port", str(port), "--graceful-timeout", "1", "--log-level", "warning"]
    if model.name in C_PROGRAMS:
        return Launch([str(program(C_PROGRAMS[model.name])), "--host", "127.0.0.1", str(port)], False)
    if model.name in ("fork", "select", "zmq"):
        return Launch([myecho, "serve", model.name, *python_model], True)
    if model.name == "select-2":
        return Launch([myecho, "serve", "select", "--workers", "2", *python_model], True)
    if model.name == "aio":
        return Launch([myecho, "serve", "asyncio", *python_model], True)
    if model.name == "fork-classic":
        return Launch([myecho, "serve", "fork", "--spare-children", "0", *python_model], True)
    if model.name in ("asyncio", "uvloop"):
        return Launch([sys.executable, "-m", "myecho.bench.pyservers", model.name, "--port", str(port)], True)
    if model.name.startswith("broker"):
        # One process tree: the shell starts the workers, then becomes the broker (exec), their parent.
        workers = int(model.name.partition("-")[2] or BROKER_WORKERS)
        backend = f"ipc://{workdir / 'backend'}"
        quiet = ["--log-level", "warning", "--graceful-timeout", "1"]
        worker = shlex.join([myecho, "serve", "worker", "--connect", backend, *quiet])
        broker = shlex.join([myecho, "serve", "broker", "--port", str(port), "--backend", backend, *quiet])
        return Launch(["/bin/sh", "-c", f"{' & '.join([worker] * workers)} & exec {broker}"], False)
    inetd = inetd_command()
    if model.name == "inetd-systemd":
        tool = shutil.which("systemd-socket-activate") or "systemd-socket-activate"
        return Launch([tool, "--inetd", "-a", f"--listen=127.0.0.1:{port}", *inetd], False)
    if model.name.startswith("inetd-xinetd"):
        limits = "" if model.name.endswith("cps50") else XINETD_LIFTED
        config = workdir / "xinetd.conf"
        config.write_text(
            XINETD_SERVICE.format(
                user=getpass.getuser(), port=port, server=inetd[0], server_args=" ".join(inetd[1:]), limits=limits
            )
        )
        return Launch(
            [
                xinetd_path() or "xinetd",
                "-dontfork",
                "-f",
                str(config),
                "-filelog",
                str(workdir / "xinetd.log"),
                "-pidfile",
                str(workdir / "xinetd.pid"),
            ],
            False,
        )
    raise ServerError(f"no way to start {model.name}")


class Server:
    """A server under test: started here, or found listening (``--target``)."""

    def __init__(self, model: Model, host: str, port: int) -> None:
        self.model = model
        self.host = host
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.root: int | None = None
        self.workdir: Path | None = None
        self.log_path: Path | None = None

    @classmethod
    def start(cls, model: Model, timeout: float = 20.0, attempts: int = 3) -> Server:
        """Start ``model`` on a free loopback port and wait until it serves.

        A port found free can be taken before the server binds it (any
        outgoing connection on the machine may get it as its source port),
        so a server that exits at once is tried again on another port.
        """
        for attempt in range(1, attempts + 1):
            try:
                return cls._start(model, timeout)
            except ServerError as error:
                if attempt == attempts or not error.early:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _start(cls, model: Model, timeout: float) -> Server:
        server = cls(model, "127.0.0.1", free_port())
        server.workdir = Path(tempfile.mkdtemp(prefix=f"myecho-bench-{model.name}-"))
        launch = launch_command(model, server.port, server.workdir)
        env = dict(os.environ, MYECHO_GRACEFUL_TIMEOUT="1")
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
            env.pop(name, None)
        notify = NotifySocket(server.workdir) if launch.notify else None
        if notify is not None:
            env["NOTIFY_SOCKET"] = notify.path
        server.log_path = server.workdir / "server.log"
        with open(server.log_path, "wb") as log_file:
            server.proc = subprocess.Popen(
                launch.argv, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True
            )
        server.root = server.proc.pid
        try:
            if notify is not None:
                notify.wait_ready(timeout, server.proc)
            else:
                wait_listening(server.host, server.port, timeout, server.proc)
        except ServerError as error:
            log = server.log_tail()
            early = server.proc.poll() is not None
            server.stop()
            raise ServerError(f"{model.name}: {error}; log: {log}", early=early) from None
        finally:
            if notify is not None:
                notify.close()
        return server

    @classmethod
    def attach(cls, model: Model, host: str, port: int) -> Server:
        """A service already running; its processes are measured when it is local."""
        server = cls(model, host, port)
        if host.startswith("127.") or host in ("localhost", "::1"):
            server.root = procs.listener_owner(port)
        return server

    def log_tail(self, lines: int = 5) -> str:
        if self.log_path is None:
            return ""
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        return ""

    @property
    def measurable(self) -> bool:
        """Whether CPU and memory of the server can be read (we know its processes)."""
        return self.root is not None

    def pids(self) -> list[int]:
        return procs.tree(self.root) if self.root is not None else []

    def cpu(self) -> float | None:
        return procs.cpu_seconds(self.pids()) if self.root is not None else None

    def main_cpu(self) -> float | None:
        """The CPU of the server's main process alone: the broker without its workers."""
        return procs.own_cpu_seconds(self.root) if self.root is not None else None

    def memory(self) -> procs.Memory | None:
        return procs.memory(self.pids()) if self.root is not None else None

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def settle(self, processes: int, timeout: float = 5.0) -> None:
        """Wait until the tree is back to ``processes`` (fork children gone)."""
        deadline = time.monotonic() + timeout
        while self.root is not None and time.monotonic() < deadline and len(self.pids()) > processes:
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, a short grace, then SIGKILL for the whole process group.

        The server runs in a session of its own (start_new_session), and its
        leader is not reaped before the group is killed, so the group id
        cannot have been reused: no process of anybody else is touched.
        """
        if self.proc is None:
            return
        pid = self.proc.pid
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and not _exited(pid):
                time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.proc.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it (WNOWAIT)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True
