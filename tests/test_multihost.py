"""The broker across hosts: four network namespaces joined by veth links.

    broker 10.86.2.1 (br0) --veth-- worker host 1 10.86.2.2
                           --veth-- worker host 2 10.86.2.3
                           --veth-- clients       10.86.2.4

The /24 exists only inside these namespaces (no route out, nothing in the
host's namespace), which are removed at the end, whatever happens. Every
process runs as ``ip netns exec HOST ...``. Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import Server, command, wait_status

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (ip netns)"
)

SUBNET = "10.86.2"
BROKER = f"{SUBNET}.1"
BEATS = ["--heartbeat", "0.2", "--liveness", "3"]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Hosts:
    """The namespaces: ``hosts.run(host, argv)`` is ``ip netns exec``."""

    def __init__(self) -> None:
        tag = f"myecho{os.getpid() % 100000}"
        self.names = {host: f"{tag}-{host}" for host in ("broker", "w1", "w2", "clients")}
        self.made: list[str] = []
        self.servers: list[Server] = []

    def build(self) -> None:
        for name in self.names.values():
            ip("netns", "add", name)
            self.made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        hub = self.names["broker"]
        ip("-n", hub, "link", "add", "br0", "type", "bridge")
        ip("-n", hub, "addr", "add", f"{BROKER}/24", "dev", "br0")
        ip("-n", hub, "link", "set", "br0", "up")
        for number, host in enumerate(("w1", "w2", "clients"), start=2):
            name = self.names[host]
            ip("-n", hub, "link", "add", f"to-{host}", "type", "veth", "peer", "name", "eth0", "netns", name)
            ip("-n", hub, "link", "set", f"to-{host}", "master", "br0", "up")
            ip("-n", name, "addr", "add", f"{SUBNET}.{number}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")

    def argv(self, host: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.names[host], *argv]

    def serve(self, host: str, *argv: str) -> Server:
        server = Server(self.argv(host, command("myecho"), "serve", *argv, *BEATS), 0)
        assert server.notify is not None
        server.notify.follow()
        self.servers.append(server)
        return server.wait_ready()

    def broker(self, *security: str) -> Server:
        """The broker; plain unless given CURVE options (a plain backend off loopback needs --insecure)."""
        return self.serve(
            "broker",
            "broker",
            "--frontend",
            f"tcp://{BROKER}:11144",
            "--backend",
            f"tcp://{BROKER}:11145",
            *(security or ["--insecure"]),
        )

    def worker(self, host: str, *security: str) -> Server:
        return self.serve(host, "worker", "--connect", f"tcp://{BROKER}:11145", *security)

    def clients(self, count: int, seconds: float) -> tuple[list[subprocess.Popen[bytes]], float]:
        start_at = time.time() + 1.5
        argv = self.argv(
            "clients",
            sys.executable,
            "-m",
            "myecho.bench.measure",
            "client",
            f"tcp://{BROKER}:11144",
            "--seconds",
            str(seconds),
            "--start-at",
            repr(start_at),
        )
        return [subprocess.Popen(argv, stdout=subprocess.PIPE) for _ in range(count)], start_at

    def remove(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.signal(signal.SIGCONT)
            server.kill()
        for name in self.made:
            found = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10)
            for pid in found.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    made = Hosts()
    try:
        made.build()
        yield made
    finally:
        made.remove()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        assert not any(name in left for name in made.names.values()), left


def results(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[dict[str, Any]]:
    return [json.loads(proc.communicate(timeout=timeout)[0]) for proc in procs]


def answered_by(worker: Server) -> int:
    """Requests a worker answered so far: its latest STATUS (sent every second)."""
    assert worker.notify is not None
    latest = ""
    deadline = time.monotonic() + 1.5
    while (left := deadline - time.monotonic()) > 0:
        message = worker.notify.receive(left)
        latest = message.get("STATUS", latest) if message else latest
    found = re.search(r"(\d+) messages", latest)
    assert found, latest
    return int(found.group(1))


def test_broker_workers_and_clients_on_four_hosts(hosts: Hosts) -> None:
    broker = hosts.broker()
    w1, w2 = hosts.worker("w1"), hosts.worker("w2")
    wait_status(broker, "; 2 workers (")

    # Under load from the clients' host: kill a worker, then add one.
    procs, start_at = hosts.clients(3, seconds=4)
    time.sleep(max(0.0, start_at + 1.0 - time.time()))
    w1.signal(signal.SIGKILL)
    time.sleep(0.5)
    w3 = hosts.worker("w1")
    reports = results(procs, timeout=60)
    sent = sum(r["sent"] for r in reports)
    assert sum(r["answered"] for r in reports) == sent > 300
    assert [(r["lost"], r["duplicates"], r["strays"]) for r in reports] == [(0, 0, 0)] * 3
    assert w1.proc.wait(5) == -signal.SIGKILL
    assert answered_by(w3) > 50  # the new worker took its share

    # Restart the broker: the workers on the other hosts find it again.
    assert broker.stop() == 0
    broker = hosts.broker()
    wait_status(broker, "; 2 workers (", timeout=10)
    procs, _ = hosts.clients(2, seconds=1)
    reports = results(procs, timeout=60)
    assert sum(r["answered"] for r in reports) == sum(r["sent"] for r in reports) > 20
    assert [(r["lost"], r["duplicates"], r["strays"]) for r in reports] == [(0, 0, 0)] * 2
    for worker in (w2, w3):
        assert worker.stop() == 0


def test_curve_across_hosts(hosts: Hosts, tmp_path: Path) -> None:
    """Workers on two hosts with their own keys; only the allowed one gets any work."""
    for name in ("broker", "w1", "w2"):
        made = subprocess.run([command("myecho"), "keygen", str(tmp_path), name], capture_output=True, timeout=20)
        assert made.returncode == 0, made.stderr
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(tmp_path / "w1.key", allow)  # w2's key is not copied: it is not allowed in

    def curve(name: str) -> list[str]:
        return ["--curve-secret", str(tmp_path / f"{name}.key_secret"), "--curve-server", str(tmp_path / "broker.key")]

    plain = subprocess.run(
        hosts.argv("broker", command("myecho"), "serve", "broker", "--backend", f"tcp://{BROKER}:11145"),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert plain.returncode == 1 and "reachable from other hosts and has no CURVE" in plain.stderr
    broker = hosts.broker("--curve-secret", str(tmp_path / "broker.key_secret"), "--curve-allow", str(allow))
    w1 = hosts.worker("w1", *curve("w1"))
    w2 = hosts.worker("w2", *curve("w2"))
    wait_status(broker, "; 1 worker (")
    procs, _ = hosts.clients(2, seconds=1.5)
    reports = results(procs, timeout=60)
    sent = sum(r["sent"] for r in reports)
    assert sum(r["answered"] for r in reports) == sent > 20
    assert [(r["lost"], r["duplicates"], r["strays"]) for r in reports] == [(0, 0, 0)] * 2
    assert answered_by(w2) == 0
    assert answered_by(w1) == sent
    assert "unknown CURVE key" in broker.stderr
    for server in (w1, w2, broker):
        assert server.stop() == 0
