"""Compile the C reference servers with the package build.

``pip install .`` (and, later, Debian's pybuild) runs build_py; this hook
compiles c/*.c and c/bench/*.c into myecho/_bin/ inside the build tree, with
the caller's CC/CFLAGS/CPPFLAGS/LDFLAGS (dpkg-buildflags under debhelper),
or with hardening flags when none are given. No binary is ever committed.

zmq-echo, the zmq models' C limit, links libzmq: it is built when
pkg-config finds libzmq (Debian: libzmq3-dev, a build dependency of the
package), and skipped with a warning otherwise; myecho-bench then says
why its row is missing.
"""

import os
import shlex
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

PROGRAMS = ("myecho-c", "epoll-echo", "myecho-load")
#: Programs that need a library, found with pkg-config: program -> (its
#: pkg-config name, the Debian package that provides it).
LIBRARY_PROGRAMS = {"zmq-echo": ("libzmq", "libzmq3-dev")}
HARDENING_CFLAGS = "-O2 -g -Wall -Wextra -fstack-protector-strong -fPIE -D_FORTIFY_SOURCE=2"
HARDENING_LDFLAGS = "-pie -Wl,-z,relro,-z,now"


def _flags(name: str, default: str) -> list[str]:
    return shlex.split(os.environ.get(name, default))


def _library_flags(package: str) -> tuple[list[str], list[str]] | None:
    """pkg-config's (cflags, libs) for ``package``, or None if it is not installed."""
    try:
        cflags, libs = (
            subprocess.run(["pkg-config", option, package], check=True, capture_output=True, text=True).stdout
            for option in ("--cflags", "--libs")
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return shlex.split(cflags), shlex.split(libs)


class BuildWithC(build_py):
    def run(self) -> None:
        super().run()
        source_dir = Path(__file__).parent / "c"
        target_dir = Path(self.build_lib) / "myecho" / "_bin"
        target_dir.mkdir(parents=True, exist_ok=True)
        compiler = shlex.split(os.environ.get("CC", "cc"))
        builds: list[tuple[str, list[str], list[str]]] = [(program, [], []) for program in PROGRAMS]
        for program, (package, debian) in LIBRARY_PROGRAMS.items():
            flags = _library_flags(package)
            if flags is None:
                self.warn(f"{program} not built: pkg-config cannot find {package} (Debian: {debian})")
            else:
                builds.append((program, *flags))
        for program, cflags, libs in builds:
            command = [
                *compiler,
                "-std=gnu11",
                *_flags("CPPFLAGS", ""),
                *_flags("CFLAGS", HARDENING_CFLAGS),
                *cflags,
                str(source_dir / (f"{program}.c" if program == "myecho-c" else f"bench/{program}.c")),
                "-o",
                str(target_dir / program),
                *_flags("LDFLAGS", HARDENING_LDFLAGS),
                *libs,
            ]
            self.announce(" ".join(command), level=2)
            subprocess.run(command, check=True)


class BinaryDistribution(Distribution):
    """The wheel holds compiled programs: tag it for this platform."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildWithC}, distclass=BinaryDistribution)
