"""CURVE from the packaged units: the opt-in drop-ins of /usr/share/myecho/curve/.

Offline first (the drop-ins against the source units), then a booted
bookworm with the package: keygen into /etc/myecho/curve, the drop-ins
linked in, a broker and two workers that echo, a worker with a key the
broker does not know that never joins, and a purge that takes it all away.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .container import Container
from .packaging import BROKER_PORTS, MAX_EXPOSURE, MAX_WORKER_EXPOSURE, REPO, SYSTEMD_DIR, WORKER, exposure
from .test_package import debs  # noqa: F401  (the session fixture: the packages under test)

DROPINS = REPO / "curve"
BROKER = "myecho@broker.service"
WORKERS = ("myecho-worker@1.service", "myecho-worker@2.service")
PROBE = "/root/probe.py"
CURVE_DIR = "/etc/myecho/curve"
LINKS = {
    "broker.conf": f"/etc/systemd/system/{BROKER}.d/curve.conf",
    "worker.conf": "/etc/systemd/system/myecho-worker@.service.d/curve.conf",
}


def exec_start(text: str) -> str:
    """The last non-empty ExecStart= of a unit file or drop-in."""
    return [line for line in text.splitlines() if line.startswith("ExecStart=") and line != "ExecStart="][-1]


@pytest.mark.parametrize(
    ("dropin", "unit", "added"),
    [
        ("broker.conf", "myecho@.service", "--curve-secret %d/broker.key_secret --curve-allow %d"),
        ("worker.conf", "myecho-worker@.service", "--curve-secret %d/worker.key_secret --curve-server %d/broker.key"),
    ],
)
def test_dropins_start_what_the_unit_starts_plus_curve(dropin: str, unit: str, added: str) -> None:
    """A drop-in replaces ExecStart=: it must stay the unit's, plus the CURVE options."""
    main = exec_start((SYSTEMD_DIR / unit).read_text())  # %i and all: a drop-in is read with its unit's instance
    assert exec_start((DROPINS / dropin).read_text()) == f"{main} {added}"


def test_debian_ships_the_dropins_outside_the_unit_path() -> None:
    install = (REPO / "debian" / "myecho.install").read_text()
    for name in LINKS:
        assert f"curve/{name} usr/share/myecho/curve/" in install


# ------------------------------------------------------------ booted container


@pytest.fixture(scope="module")
def box(rootfs: Path, debs: list[Path]) -> Iterator[Container]:  # noqa: F811
    with Container(rootfs) as booted:
        booted.apt_install_deb(*debs)
        booted.copy_in(Path(__file__).with_name("probe.py"), PROBE)
        yield booted


def probe(box: Container, *args: object) -> dict[str, Any]:
    result = box.run(["python3", PROBE, *map(str, args)], check=False, timeout=120)
    try:
        outcome: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"probe {args} failed:\n{result.stdout}\n{result.stderr}") from None
    return outcome


def status_text(box: Container, unit: str) -> str:
    return box.systemctl("show", "-P", "StatusText", unit).stdout.strip()


def wait_for(what: str, check: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def test_broker_and_two_workers_with_curve(box: Container) -> None:
    # The package made the folder, root's alone.
    assert box.run(["stat", "-c", "%a %U", CURVE_DIR, f"{CURVE_DIR}/workers"]).stdout.split() == ["700", "root"] * 2

    # Drop-ins linked before any key exists: the broker does not start at all (no plain fallback).
    for name, link in LINKS.items():
        box.run(f"mkdir -p {shlex.quote(str(Path(link).parent))} && ln -s /usr/share/myecho/curve/{name} '{link}'")
    box.systemctl("daemon-reload")
    failed = box.systemctl("start", BROKER, check=False)
    assert failed.returncode != 0
    assert box.systemctl("show", "-P", "ExecMainStatus", BROKER).stdout.strip() == "243"  # CREDENTIALS
    time.sleep(0.5)
    assert box.systemctl("show", "-P", "NRestarts", BROKER).stdout.strip() == "0"  # no restart loop either
    box.systemctl("reset-failed", check=False)

    # keygen on "each host": the broker's pair, this host's worker pair, a rogue's pair elsewhere.
    for name in ("broker", "worker"):
        box.run(["myecho", "keygen", CURVE_DIR, name])
    box.run(["cp", f"{CURVE_DIR}/worker.key", f"{CURVE_DIR}/workers/host1.key"])
    box.run(["mkdir", "-p", "/root/rogue"])
    box.run(["myecho", "keygen", "/root/rogue", "rogue"])
    assert box.run(["stat", "-c", "%a", f"{CURVE_DIR}/broker.key_secret"]).stdout.strip() == "600"

    box.systemctl("start", BROKER, *WORKERS)
    wait_for("both workers at the broker", lambda: "2 workers" in status_text(box, BROKER))
    outcome = probe(box, "zmq", BROKER_PORTS[0], "--count", 20)
    assert outcome["ok"] and outcome["replies"] == 20, outcome
    journal = box.journal(BROKER, "-o", "cat")
    assert re.search(r"CURVE server with /run/credentials/myecho@broker.service/broker.key_secret", journal), journal
    assert "1 worker key (workers_host1.key)" in journal, journal

    # A worker with a key the broker does not know, and a plain one: neither joins.
    rogue = "--curve-secret /root/rogue/rogue.key_secret --curve-server /etc/myecho/curve/broker.key"
    box.run(f"systemd-run -p Type=notify --unit rogue-curve myecho serve worker --heartbeat 0.2 {rogue}")
    box.run("systemd-run -p Type=notify --unit rogue-plain myecho serve worker --heartbeat 0.2")
    wait_for("the rogue refused", lambda: "unknown CURVE key" in box.journal(BROKER, "-o", "cat"))
    time.sleep(1.5)
    assert "2 workers" in status_text(box, BROKER)
    outcome = probe(box, "zmq", BROKER_PORTS[0], "--count", 20)
    assert outcome["ok"] and outcome["replies"] == 20, outcome
    for rogue_unit in ("rogue-curve.service", "rogue-plain.service"):
        assert status_text(box, rogue_unit).startswith("0 open, 0 served, 0 messages"), status_text(box, rogue_unit)
    started = time.monotonic()
    box.systemctl("stop", "rogue-curve.service", "rogue-plain.service")
    print(f"rogues stopped in {time.monotonic() - started:.1f}s")

    # The drop-ins change no sandbox setting.
    scores = exposure(
        box.run(["systemd-analyze", "security", "--no-pager", BROKER, WORKER], env={"SYSTEMD_COLORS": "0"}).stdout
    )
    assert scores[BROKER] < MAX_EXPOSURE and scores[WORKER] <= MAX_WORKER_EXPOSURE, scores
    started = time.monotonic()
    box.systemctl("stop", *WORKERS, BROKER, "myecho@broker.socket")
    print(f"broker and workers stopped in {time.monotonic() - started:.1f}s")
    assert box.systemctl("show", "-P", "Result", BROKER).stdout.strip() == "success"


def test_purge_takes_the_keys_and_the_dropin_links(box: Container) -> None:
    box.apt_get("purge", "myecho")
    left = box.run(
        f"ls -d {CURVE_DIR} /etc/myecho {' '.join(LINKS.values())} "
        f"{' '.join(str(Path(link).parent) for link in LINKS.values())} 2>/dev/null; true"
    ).stdout.split()
    assert not left, left
