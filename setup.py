"""Compile the C programs with the package build.

``pip install .`` runs build_py; this hook runs the one recipe for the C
programs, c/Makefile, into myecho/_bin/ inside the build tree, where
myecho.reference finds them. make takes CC, CPPFLAGS, CFLAGS and LDFLAGS
from the environment and puts hardening flags in for those not given. No
binary is ever committed.

zmq-echo, the zmq models' C limit, links libzmq: the recipe builds it when
pkg-config finds libzmq (Debian: libzmq3-dev) and skips it with a warning
otherwise; myecho-bench then says why its row is missing.

MYECHO_BUILD_C=0 leaves the C programs out: debian/rules runs the same
recipe itself and installs them where Debian puts programs.
"""

import os
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py


class BuildWithC(build_py):
    def run(self) -> None:
        super().run()
        if os.environ.get("MYECHO_BUILD_C", "1") == "0":
            return
        target_dir = Path(self.build_lib, "myecho", "_bin").resolve()
        command = [
            "make",
            "-C",
            str(Path(__file__).parent / "c"),
            f"O={target_dir}",
            f"VERSION={self.distribution.get_version()}",
        ]
        self.announce(" ".join(command), level=2)
        try:
            subprocess.run(command, check=True)
        except OSError as error:
            raise SystemExit(f"setup.py: cannot run make to build the C programs: {error.strerror}") from None
        except subprocess.CalledProcessError as error:
            raise SystemExit(f"setup.py: building the C programs failed (make exit {error.returncode})") from None


class BinaryDistribution(Distribution):
    """The wheel holds programs compiled for this platform: install it in
    platlib and keep the platform in its tag (see PlatformWheel)."""

    def has_ext_modules(self) -> bool:
        return True


try:  # setuptools >= 70.1 has its own; Debian 12's (66) uses the wheel package's
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:
    from wheel.bdist_wheel import bdist_wheel


class PlatformWheel(bdist_wheel):
    """Tag the wheel py3-none-PLATFORM: its programs need this platform, but
    it has no extension module, so any Python 3 runs it (not cp311-cp311)."""

    def get_tag(self) -> tuple[str, str, str]:
        return "py3", "none", super().get_tag()[2]


setup(cmdclass={"build_py": BuildWithC, "bdist_wheel": PlatformWheel}, distclass=BinaryDistribution)
