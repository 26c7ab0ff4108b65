"""Compile the C reference servers with the package build.

``pip install .`` (and, later, Debian's pybuild) runs build_py; this hook
compiles benchmarks/c/*.c into myecho/_bin/ inside the build tree, with
the caller's CC/CFLAGS/CPPFLAGS/LDFLAGS (dpkg-buildflags under debhelper),
or with hardening flags when none are given. No binary is ever committed.
"""

import os
import shlex
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

PROGRAMS = ("myecho-c", "epoll-echo", "myecho-load")
HARDENING_CFLAGS = "-O2 -g -Wall -Wextra -fstack-protector-strong -fPIE -D_FORTIFY_SOURCE=2"
HARDENING_LDFLAGS = "-pie -Wl,-z,relro,-z,now"


def _flags(name: str, default: str) -> list[str]:
    return shlex.split(os.environ.get(name, default))


class BuildWithC(build_py):
    def run(self) -> None:
        super().run()
        source_dir = Path(__file__).parent / "benchmarks" / "c"
        target_dir = Path(self.build_lib) / "myecho" / "_bin"
        target_dir.mkdir(parents=True, exist_ok=True)
        compiler = shlex.split(os.environ.get("CC", "cc"))
        for program in PROGRAMS:
            command = [
                *compiler,
                "-std=gnu11",
                *_flags("CPPFLAGS", ""),
                *_flags("CFLAGS", HARDENING_CFLAGS),
                str(source_dir / f"{program}.c"),
                "-o",
                str(target_dir / program),
                *_flags("LDFLAGS", HARDENING_LDFLAGS),
            ]
            self.announce(" ".join(command), level=2)
            subprocess.run(command, check=True)


class BinaryDistribution(Distribution):
    """The wheel holds compiled programs: tag it for this platform."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildWithC}, distclass=BinaryDistribution)
