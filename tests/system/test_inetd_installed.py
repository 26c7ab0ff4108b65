"""The inetd model as the package installs it, in a booted Debian 12: the
``myecho`` command's lean path, and myecho-bench measuring both shipped
ways to run it (xinetd's file, myecho-inetd.socket with its own settings)
against the bare interpreter's start in the same run."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .container import Container
from .packaging import REPO, package_debs


@pytest.fixture(scope="module")
def installed(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """A booted container with the packages ($MYECHO_DEB, else built now) and xinetd installed."""
    debs = package_debs(tmp_path_factory)
    with Container(rootfs) as booted:
        booted.apt_install_deb(*debs)
        booted.apt_get("install", "--no-install-recommends", "xinetd")
        yield booted


def _imports(box: Container, *argv: str) -> set[str]:
    result = box.run(["/usr/bin/python3", "-X", "importtime", *argv], input="x")
    assert result.stdout == ("x" if "serve" in argv else ""), result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "encodings" in imported, result.stderr
    return imported


def test_installed_command_takes_the_lean_path(installed: Container) -> None:
    """/usr/bin/myecho serve inetd imports what python3 imports anyway, and the inetd model."""
    assert installed.run(["myecho", "serve", "inetd"], input="bytes\x00back").stdout == "bytes\x00back"
    extra = _imports(installed, "/usr/bin/myecho", "serve", "inetd") - _imports(installed, "-c", "pass")
    assert extra == {"myecho", "myecho.models", "myecho.models.inetd"}, extra


def test_bench_measures_both_shipped_inetd_ways_against_the_interpreter(installed: Container) -> None:
    """myecho-bench --installed: xinetd with the shipped file (enabled), myecho-inetd.socket as shipped,
    and python3 -I -S -c pass timed in the same run, alone and behind a copy of the socket unit; the
    socket unit's settings are recorded."""
    box = installed
    box.run(r"sed -i 's/^\(\s*disable\s*=\s*\)yes/\1no/' /etc/xinetd.d/myecho")
    box.systemctl("restart", "xinetd")
    box.systemctl("start", "myecho-inetd.socket")
    deadline = time.monotonic() + 15
    while ":11138 " not in box.run(["ss", "-Htln"]).stdout:
        assert time.monotonic() < deadline, "xinetd does not listen on 11138"
        time.sleep(0.2)
    result = box.run(
        [
            "myecho-bench",
            "--installed",
            "--models",
            "inetd-xinetd,inetd-systemd",
            "--scenarios",
            "single",
            "--trials",
            "200",
            "--json",
            "/root/inetd.json",
            "--no-progress",
        ],
        timeout=300,
    )
    print(result.stdout)
    document = json.loads(box.run(["cat", "/root/inetd.json"]).stdout)
    assert document["mode"] == "installed"
    start = document["interpreter_start"]
    assert start["command"] == "/usr/bin/python3 -I -S -c pass" and start["runs"] == 200
    shipped = (REPO / "systemd" / "myecho-inetd.socket").read_text()
    unit = document["inetd_socket_unit"]
    assert unit["Accept"] == "yes"
    for name in ("MaxConnections", "TriggerLimitBurst"):
        found = re.search(rf"^{name}=(\d+)", shipped, re.MULTILINE)
        if found:
            assert unit[name] == found.group(1), (name, unit)
    rows = {model["name"]: model for model in document["models"]}
    for name in ("inetd-xinetd", "inetd-systemd"):
        assert not rows[name]["skipped"] and not rows[name]["failures"], rows[name]
        assert rows[name]["single"]["errors"] == {}, rows[name]["single"]
    said = next(line for line in result.stdout.splitlines() if "myecho-inetd.socket as installed (" in line)
    assert "Accept=yes" in said and f"MaxConnections={unit['MaxConnections']}" in said
    # The same interpreter behind a copy of the installed units: what systemd's unit costs before the model.
    behind = document["interpreter_start_unit"]
    assert behind["unit"] == "myecho-bench-floor.socket" and behind["runs"] == 200, behind
    assert behind["command"] == start["command"]
    said = next(line for line in result.stdout.splitlines() if line.startswith("Reference behind the socket unit"))
    assert re.search(r"; inetd by systemd: exchange 1 = \d+\.\d\d×$", said), said
    # ... and gone again: no file, no unit left behind.
    assert box.run("ls /run/systemd/system/ | grep -c myecho-bench-floor", check=False).stdout.strip() == "0"
    units = box.run(["systemctl", "list-units", "--all", "--no-legend", "--plain"]).stdout.splitlines()
    assert not [unit for unit in units if "bench-floor" in unit or "bench\\x2dfloor" in unit], units
