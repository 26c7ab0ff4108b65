"""Where the C programs are, and ``myecho-c`` for pip installs.

c/Makefile builds the C programs: ``myecho-c`` (the talk's echo, a
service of its own), the load generator ``myecho-load`` and the references
``epoll-echo`` and ``zmq-echo``. The two ways to install myecho put them in
two places, looked at in this order:

1. pip: the package's own ``_bin/`` folder, beside this module (setup.py
   builds them there), or the installed distribution's ``myecho/_bin/``
   when ``myecho`` is imported from a source tree ahead of its installed
   copy, as the test suite does;
2. Debian: ``/usr/bin/myecho-c`` (the program itself, package myecho) and
   ``/usr/libexec/myecho/NAME`` for the others (package myecho-bench),
   where Debian puts programs that only another program runs.

A pip install puts console scripts on PATH, not the compiled programs of
its package, so there ``myecho-c`` is a console script that replaces itself
(execv, same pid: socket activation's LISTEN_PID still matches) with the
compiled program; Debian installs the program itself as /usr/bin/myecho-c.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

BIN_DIR = Path(__file__).parent / "_bin"
#: The Debian package's places: /usr/bin for the program users run,
#: /usr/libexec/myecho for those only myecho-bench runs.
DEBIAN_BIN_DIR = Path("/usr/bin")
DEBIAN_LIBEXEC_DIR = Path("/usr/libexec/myecho")
DEBIAN_IN_BIN = frozenset({"myecho-c"})


def places(name: str) -> list[Path]:
    """Where program ``name`` may be, in the order they are looked at."""
    found = [BIN_DIR / name]
    try:
        installed = Path(str(metadata.distribution("myecho").locate_file(f"myecho/_bin/{name}")))
    except metadata.PackageNotFoundError:
        installed = found[0]
    if installed != found[0]:
        found.append(installed)
    found.append((DEBIAN_BIN_DIR if name in DEBIAN_IN_BIN else DEBIAN_LIBEXEC_DIR) / name)
    return found


def program(name: str) -> Path:
    """The path of a compiled program, e.g. ``myecho-c``: the first of
    places() that exists, else the first of them (for an error to name)."""
    candidates = places(name)
    return next((path for path in candidates if path.is_file()), candidates[0])


def exec_program(name: str) -> int:
    path = program(name)
    try:
        os.execv(path, [name, *sys.argv[1:]])
    except OSError as error:
        print(
            f"{name}: cannot run {path}: {error.strerror} (was the package built with a C compiler?)", file=sys.stderr
        )
    return 127


def main_c() -> int:
    """The ``myecho-c`` console script of a pip install."""
    return exec_program("myecho-c")
