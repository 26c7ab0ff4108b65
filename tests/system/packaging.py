"""Host-side helpers of the package tests: find or build the .debs, read unit files.

Kept apart from the tests so that test_unit_files.py (no container) and
test_package.py (booted containers) share them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO / "systemd"
BUILD_DEB = REPO / "tools" / "build-deb"

#: The packaged units' ports (the README's table).
PORTS = {
    "inetd-xinetd": 11138,
    "fork": 11139,
    "select": 11140,
    "zmq": 11141,
    "c": 11142,
    "inetd": 11143,
    "asyncio": 11150,
}
MODELS = ("fork", "select", "asyncio", "zmq", "c")
PYTHON_MODELS = ("fork", "select", "asyncio", "zmq")
#: The broker (myecho@broker): clients, then workers, both in myecho@broker.socket.
BROKER_PORTS = (11144, 11145)
#: Every service unit the package runs that holds no network of its own, as
#: systemd-analyze sees it.
SERVICES = (
    *(f"myecho@{m}.service" for m in (*MODELS, "broker")),
    "myecho-inetd@0-127.0.0.1:11143-127.0.0.1:1.service",
)
#: systemd-analyze security's exposure: 1.0 at most; with the socket held by systemd, under 0.5.
MAX_EXPOSURE = 0.5
#: A broker worker connects out (no PrivateNetwork=, AF_INET allowed) and
#: libzmq needs sched_setscheduler; an IP allow list of localhost (the default
#: broker address; an admin adds a remote broker's) brings it to 1.0, the
#: issue's bound.
WORKER = "myecho-worker@1.service"
MAX_WORKER_EXPOSURE = 1.0

_EXPOSURE = re.compile(r"Overall exposure level for (\S+): (\d+\.\d+)")


#: The binary packages of the source package myecho.
PACKAGES = ("myecho", "myecho-bench")


def build_debs(outdir: Path, version: str | None = None, timeout: float = 900) -> list[Path]:
    """tools/build-deb OUTDIR [VERSION]; returns the .debs it made, myecho first."""
    command = [str(BUILD_DEB), str(outdir), *([version] if version else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return _in_package_order([Path(line) for line in result.stdout.splitlines() if line.endswith(".deb")])


def given_debs(value: str) -> list[Path]:
    """The .debs that $MYECHO_DEB names: paths separated by spaces, or a
    folder holding them (make deb's dist/); one of each package, myecho first."""
    debs: list[Path] = []
    for word in value.split():
        path = Path(word).resolve()
        if path.is_dir():
            debs += [deb for deb in path.glob("*.deb") if deb.name.split("_")[0] in PACKAGES]
        elif path.is_file():
            debs.append(path)
        else:
            raise FileNotFoundError(f"MYECHO_DEB: no such file or folder: {word}")
    return _in_package_order(debs)


def _in_package_order(debs: list[Path]) -> list[Path]:
    by_package: dict[str, Path] = {}
    for deb in debs:
        package = deb.name.split("_")[0]
        if package in by_package:
            raise ValueError(f"two .debs of {package}: {by_package[package]} and {deb}")
        by_package[package] = deb
    missing = set(PACKAGES) - set(by_package)
    if missing:
        raise ValueError(f"no .deb of {', '.join(sorted(missing))} among {[str(d) for d in debs]}")
    return [by_package[package] for package in PACKAGES]


def package_debs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The packages under test: those $MYECHO_DEB names (`make deb`'s), else built now."""
    given = os.environ.get("MYECHO_DEB")
    if given:
        try:
            return given_debs(given)
        except (OSError, ValueError) as error:
            pytest.fail(str(error), pytrace=False)
    started = time.monotonic()
    debs = build_debs(tmp_path_factory.mktemp("deb"))
    print(f"built {', '.join(deb.name for deb in debs)} in {time.monotonic() - started:.1f}s")
    return debs


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True, check=True
    ).stdout.strip()


def exposure(output: str) -> dict[str, float]:
    """{unit: score} from `systemd-analyze security` output."""
    return {unit: float(score) for unit, score in _EXPOSURE.findall(output)}


def unit_root(where: Path) -> Path:
    """A file system root holding the source units where systemd looks for
    them (lib/systemd/system), drop-in directories included."""
    target = where / "lib" / "systemd" / "system"
    shutil.copytree(SYSTEMD_DIR, target, dirs_exist_ok=True)
    return where


def offline_exposure(root: Path, unit: str) -> float:
    """systemd-analyze security --offline=true on the source units (no
    systemd needed as PID 1)."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", f"--root={root}", "--no-pager", unit],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )
    scores = exposure(result.stdout + result.stderr)
    if unit not in scores:
        raise AssertionError(f"no score for {unit}:\n{result.stdout}\n{result.stderr}")
    return scores[unit]
