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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from myecho.bench import procs
from myecho.bench.harness import ServerError, ServerProcess, free_port
from myecho.core.settings import DEFAULT_PORTS
from myecho.reference import program

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
#: Every scenario, in the order they run.
SCENARIOS = ("single", "multi", "throughput", "ramp")


@dataclass(frozen=True)
class Model:
    """One row of the tables: what it is, how to start it, what to measure.

    Exactly one of ``program``, ``serve``, ``pyserver`` and ``inetd`` says
    how it starts (``serve`` with ``broker_workers``: a broker and workers).
    """

    name: str
    label: str
    protocol: str  # "tcp" or "zmq"
    description: str
    reference: bool = False  # measured to compare against, not one of myecho's models
    #: A C program of the package: myecho-c, epoll-echo, zmq-echo.
    program: str = ""
    #: The arguments of ``myecho serve``.
    serve: tuple[str, ...] = ()
    #: Workers (``myecho serve worker``) behind the ``myecho serve broker`` of ``serve``.
    broker_workers: int = 0
    #: The bare Python servers (``bench.pyservers``): asyncio, uvloop, pyzmq, zmqproxy.
    pyserver: str = ""
    #: The inetd model under a super-server: "xinetd" or "systemd" (socket activation, Accept=yes).
    inetd: str = ""
    #: xinetd keeps its default rate limit (cps = 50 10) instead of lifted limits.
    xinetd_default_limits: bool = False
    #: A Python module it needs (not a dependency of myecho).
    module: str = ""
    #: The scenarios it is measured in.
    scenarios: tuple[str, ...] = SCENARIOS
    #: Runs of each "multi" size; None: as many as the settings say.
    multi_repeats: int | None = None


MODELS = (
    Model(
        "c",
        "C (myecho-c)",
        "tcp",
        "the talk's C echo, fork per connection, corrected: the reference",
        True,
        program="myecho-c",
    ),
    Model(
        "epoll",
        "C epoll (limit)",
        "tcp",
        "a minimal single-threaded C epoll echo: the limit",
        True,
        program="epoll-echo",
    ),
    Model(
        "zmq-c",
        "C libzmq (limit)",
        "zmq",
        "a minimal C ROUTER echo on libzmq, set up as the zmq model: the limit of the zmq models",
        True,
        program="zmq-echo",
    ),
    Model(
        "inetd-xinetd",
        "inetd by xinetd",
        "tcp",
        "the inetd model (python3 -I -S inetd.py) under a private xinetd, cps lifted",
        inetd="xinetd",
    ),
    Model(
        "inetd-xinetd-cps50",
        "inetd by xinetd, cps 50",
        "tcp",
        "the same with xinetd's default rate limit (cps = 50 10): the talk's '< 120'",
        inetd="xinetd",
        xinetd_default_limits=True,
        # Its rate limit is the point: single trials would only trip it, and once
        # it refused, xinetd stays off for 10 s: more runs would only repeat that.
        scenarios=("multi", "ramp"),
        multi_repeats=1,
    ),
    Model(
        "inetd-systemd",
        "inetd by systemd",
        "tcp",
        "the inetd model behind systemd-socket-activate --inetd -a (Accept=yes); --installed: "
        "myecho-inetd.socket and its sandboxed unit per connection, as shipped",
        inetd="systemd",
    ),
    Model(
        "fork",
        "fork",
        "tcp",
        "myecho serve fork: one child per connection, forked ahead by the spawner",
        serve=("fork",),
    ),
    Model(
        "fork-classic",
        "fork, after accept",
        "tcp",
        "myecho serve fork --spare-children 0: the talk's shape, a fork between accept and the first echo",
        serve=("fork", "--spare-children", "0"),
    ),
    Model("select", "select", "tcp", "myecho serve select: one process, one epoll loop", serve=("select",)),
    Model(
        "select-2",
        "select, 2 workers",
        "tcp",
        "myecho serve select --workers 2: two epoll loops, each a process, on one listening socket",
        serve=("select", "--workers", "2"),
    ),
    Model(
        "aio",
        "asyncio model",
        "tcp",
        "myecho serve asyncio: asyncio.Protocol with myecho's shared layer, on uvloop when installed",
        serve=("asyncio",),
    ),
    Model("zmq", "zmq", "zmq", "myecho serve zmq: ROUTER socket, measured with REQ clients", serve=("zmq",)),
    Model(
        "broker-1",
        "zmq broker, 1 worker",
        "zmq",
        "myecho serve broker with 1 myecho serve worker behind it",
        serve=("broker",),
        broker_workers=1,
    ),
    Model(
        "broker",
        "zmq broker, 2 workers",
        "zmq",
        "myecho serve broker (REQ clients on the frontend) with 2 myecho serve worker behind it",
        serve=("broker",),
        broker_workers=2,  # one per core of this kind of machine
    ),
    Model(
        "broker-4",
        "zmq broker, 4 workers",
        "zmq",
        "myecho serve broker with 4 myecho serve worker behind it",
        serve=("broker",),
        broker_workers=4,
    ),
    Model(
        "pyzmq",
        "Python pyzmq (floor)",
        "zmq",
        "a minimal ROUTER echo on pyzmq's Cython calls, set up as zmq-c: what the zmq model's runtime costs",
        True,
        pyserver="pyzmq",
    ),
    Model(
        "zmqproxy",
        "libzmq proxy (reflector)",
        "zmq",
        "libzmq's zmq_proxy with one ROUTER as both ends, started from pyzmq: the echo without Python (and without"
        " a per-client byte bound)",
        True,
        pyserver="zmqproxy",
    ),
    Model("asyncio", "Python asyncio", "tcp", "asyncio.Protocol echo on the standard loop", True, pyserver="asyncio"),
    Model(
        "uvloop",
        "Python uvloop",
        "tcp",
        "asyncio.Protocol echo on uvloop",
        True,
        pyserver="uvloop",
        module="uvloop",
    ),
)
BY_NAME = {model.name: model for model in MODELS}
#: What a C program that was not built needs.
BUILD_NEEDS = {"zmq-echo": "no libzmq3-dev at install: apt-get install libzmq3-dev, reinstall"}

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
    if model.program:
        binary = program(model.program)
        if binary.exists():
            return None
        return f"{binary} was not built ({BUILD_NEEDS.get(model.program, 'no C compiler at install?')})"
    if model.inetd == "xinetd":
        return None if xinetd_path() else "xinetd is not installed (apt-get install xinetd)"
    if model.inetd == "systemd":
        return None if shutil.which("systemd-socket-activate") else "systemd-socket-activate is missing"
    if model.module:
        found = importlib.util.find_spec(model.module)
        return None if found else f"{model.module} is not installed (pip install {model.module})"
    return None


@dataclass
class Launch:
    argv: list[str]
    notify: bool


def launch_command(model: Model, port: int, workdir: Path) -> Launch:
    """The command line that runs ``model`` on 127.0.0.1:``port``."""
    myecho = myecho_command()
    quiet = ["--log-level", "warning", "--graceful-timeout", "1"]
    if model.program:
        return Launch([str(program(model.program)), "--host", "127.0.0.1", str(port)], False)
    if model.broker_workers:
        # One process tree: the shell starts the workers, then becomes the broker (exec), their parent.
        backend = f"ipc://{workdir / 'backend'}"
        worker = shlex.join([myecho, "serve", "worker", "--connect", backend, *quiet])
        broker = shlex.join([myecho, "serve", *model.serve, "--port", str(port), "--backend", backend, *quiet])
        return Launch(["/bin/sh", "-c", f"{' & '.join([worker] * model.broker_workers)} & exec {broker}"], False)
    if model.serve:
        return Launch([myecho, "serve", *model.serve, "--port", str(port), *quiet], True)
    if model.pyserver:
        return Launch([sys.executable, "-m", "myecho.bench.pyservers", model.pyserver, "--port", str(port)], True)
    inetd = inetd_command()
    if model.inetd == "systemd":
        tool = shutil.which("systemd-socket-activate") or "systemd-socket-activate"
        return Launch([tool, "--inetd", "-a", f"--listen=127.0.0.1:{port}", *inetd], False)
    if model.inetd == "xinetd":
        limits = "" if model.xinetd_default_limits else XINETD_LIFTED
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
        self.process: ServerProcess | None = None
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
        server.log_path = server.workdir / "server.log"
        with open(server.log_path, "wb") as log_file:
            server.process = ServerProcess(
                launch.argv,
                env={"MYECHO_GRACEFUL_TIMEOUT": "1"},
                notify=launch.notify,
                notify_dir=server.workdir,
                session=True,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        server.proc = server.process.proc
        server.root = server.proc.pid
        try:
            server.process.wait_ready(timeout, server.host, server.port)
        except ServerError as error:
            log = server.log_tail()
            early = server.proc.poll() is not None
            server.stop()
            raise ServerError(f"{model.name}: {error}; log: {log}", early=early) from None
        finally:
            server.process.close()
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
        """SIGTERM, a short grace, then SIGKILL for the whole process group
        (the server runs in a session of its own)."""
        if self.process is None:
            return
        self.process.stop(grace=3.0)
        self.process.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
