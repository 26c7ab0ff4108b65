"""The inetd model's reference: the bare interpreter's start, timed in the run.

Under xinetd or systemd's ``Accept=yes`` a new interpreter starts for every
connection, so the inetd rows' exchange 1 is mostly a program start. Its
floor is what ``python3 -I -S -c pass`` takes on the same machine at the same
moment; this module times that (spawn to exit, as the super-server's fork and
exec would pay), and, with ``--installed``, reads the settings the shipped
socket unit runs with, so the report says what the inetd row went through.

Through the shipped socket unit, systemd sets up a sandboxed service for
every connection, and that costs more than any interpreter's start. So
``--installed`` (as root, under systemd) also times the same interpreter
behind a copy of the installed units, ExecStart and port alone changed
(``unit_floor``): what a connection costs there before the model runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from myecho.bench.stats import Summary

#: Where the package installs the unit that starts the inetd model per connection.
UNIT_DIRS = ("/lib/systemd/system", "/usr/lib/systemd/system", "/etc/systemd/system")
#: The socket unit's settings that shape what a client of the inetd row meets.
SOCKET_SETTINGS = (
    "Accept",
    "Backlog",
    "MaxConnections",
    "MaxConnectionsPerSource",
    "TriggerLimitIntervalUSec",
    "TriggerLimitBurst",
)


def installed_interpreter() -> str | None:
    """The interpreter on the installed myecho-inetd@.service's ExecStart, if there is one."""
    for directory in UNIT_DIRS:
        try:
            text = (Path(directory) / "myecho-inetd@.service").read_text()
        except OSError:
            continue
        found = re.search(r"^ExecStart=[-@:+!]*(\S+)", text, re.MULTILINE)
        if found:
            return found.group(1)
    return None


def reference_argv(python: str) -> list[str]:
    return [python, "-I", "-S", "-c", "pass"]


def time_starts(python: str, runs: int) -> list[float]:
    """Seconds from spawn to exit of ``python -I -S -c pass``, ``runs`` times.

    stdin and stdout are /dev/null, as nothing is read or written; the
    environment is this one's (``-I`` makes the interpreter ignore it).
    """
    argv = reference_argv(python)
    samples = []
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1)]
        for _ in range(runs):
            start = time.perf_counter()
            pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
            _, status = os.waitpid(pid, 0)
            samples.append(time.perf_counter() - start)
            if status != 0:
                raise OSError(f"{' '.join(argv)} exited with status {status}")
    finally:
        os.close(devnull)
    return samples


def interpreter_start(python: str, samples: list[float]) -> dict[str, Any]:
    """The JSON figure: the command and its start time's median and p99."""
    summary = Summary.of(samples)
    if summary is None:
        raise ValueError("no start-up was timed")
    return {
        "command": " ".join(reference_argv(python)),
        "runs": summary.n,
        "median_s": summary.median,
        "p99_s": summary.p99,
    }


def socket_unit_settings(unit: str = "myecho-inetd.socket") -> dict[str, str] | None:
    """What systemd runs ``unit`` with (``systemctl show``), or None without systemd."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return None
    try:
        shown = subprocess.run(
            [systemctl, "show", unit, *(f"--property={name}" for name in SOCKET_SETTINGS)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if shown.returncode != 0:
        return None
    settings = dict(line.partition("=")[::2] for line in shown.stdout.splitlines() if "=" in line)
    return settings or None


#: The copy of the installed units that ``unit_floor`` starts for a while, as runtime units.
FLOOR_UNIT = "myecho-bench-floor"
RUNTIME_UNITS = Path("/run/systemd/system")


def floor_units(socket_text: str, service_text: str, python: str, port: int) -> tuple[str, str]:
    """The installed socket and service units (as ``systemctl cat`` shows them,
    drop-ins included), listening on ``port`` and running the bare interpreter
    instead of the model: every other setting as installed."""
    socket_unit = socket_text + f"\n[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n"
    service_unit = service_text + f"\n[Service]\nExecStart=\nExecStart={' '.join(reference_argv(python))}\n"
    return socket_unit, service_unit


def _systemctl(*argv: str, check: bool = True) -> str:
    done = subprocess.run(["systemctl", *argv], capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise OSError(f"systemctl {' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def unit_floor_unavailable() -> str | None:
    """Why ``unit_floor`` cannot run here, or None."""
    if shutil.which("systemctl") is None or not Path("/run/systemd/system").is_dir():
        return "systemd is not running"
    if os.geteuid() != 0:
        return "not root (it adds runtime units for a while)"
    return None


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def floor_socket(python: str, port: int) -> Iterator[str]:
    """The floor's runtime units, started, for the time of the block; then stopped and removed,
    also when SIGTERM comes meanwhile (it then ends the bench as SystemExit, after the cleanup)."""
    shown = _systemctl("cat", "myecho-inetd.socket"), _systemctl("cat", "myecho-inetd@.service")
    socket_unit, service_unit = floor_units(*shown, python=python, port=port)
    paths = RUNTIME_UNITS / f"{FLOOR_UNIT}.socket", RUNTIME_UNITS / f"{FLOOR_UNIT}@.service"
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        for path, text in zip(paths, (socket_unit, service_unit), strict=True):
            path.write_text(text)
        _systemctl("daemon-reload")
        _systemctl("start", f"{FLOOR_UNIT}.socket")
        yield f"{FLOOR_UNIT}.socket"
    finally:
        # The instances' slice (system-myecho\x2dbench\x2dfloor.slice) too: it would stay, empty.
        slice_unit = "system-" + FLOOR_UNIT.replace("-", "\\x2d") + ".slice"
        _systemctl("stop", f"{FLOOR_UNIT}.socket", slice_unit, check=False)
        for path in paths:
            path.unlink(missing_ok=True)
        _systemctl("daemon-reload", check=False)
        signal.signal(signal.SIGTERM, previous)


def time_unit_starts(port: int, runs: int, timeout: float = 10.0) -> list[float]:
    """Seconds from a connection's establishment to its EOF (or reset) behind the
    floor's socket: systemd's accept, the unit's set-up, the interpreter's start
    and exit, ``runs`` times, one after the other."""
    samples = []
    for _ in range(runs):
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            start = time.perf_counter()
            try:
                while conn.recv(4096):
                    pass
            except ConnectionResetError:
                pass
            samples.append(time.perf_counter() - start)
    return samples


def unit_floor(python: str, runs: int) -> dict[str, Any]:
    """The JSON figure: the bare interpreter behind a copy of the installed socket unit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with floor_socket(python, port) as unit:
        samples = time_unit_starts(port, runs)
    summary = Summary.of(samples)
    if summary is None:
        raise ValueError("no start-up was timed")
    return {
        "command": " ".join(reference_argv(python)),
        "unit": unit,
        "runs": summary.n,
        "median_s": summary.median,
        "p99_s": summary.p99,
    }
