"""The C reference servers, compiled from source by the package build.

``myecho-c`` is a console script so that pip puts it on PATH; it replaces
itself (execv, same pid: socket activation's LISTEN_PID still matches)
with the binary compiled into myecho/_bin/.
"""

import os
import sys
from pathlib import Path

BIN_DIR = Path(__file__).parent / "_bin"


def program(name: str) -> Path:
    """The path of a compiled reference program, e.g. ``myecho-c``."""
    return BIN_DIR / name


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
    return exec_program("myecho-c")
