"""The inetd model's reference: the bare interpreter's start, timed in the run.

Under xinetd or systemd's ``Accept=yes`` a new interpreter starts for every
connection, so the inetd rows' exchange 1 is mostly a program start. Its
floor is what ``python3 -I -S -c pass`` takes on the same machine at the same
moment; this module times that (spawn to exit, as the super-server's fork and
exec would pay), and, with ``--installed``, reads the settings the shipped
socket unit runs with, so the report says what the inetd row went through.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
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
