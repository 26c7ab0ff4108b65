"""The fork model (and the C reference): reaping, limits, daemonize."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support import (
    ServeFactory,
    Server,
    children_of,
    command,
    descendants_of,
    exchange,
    roundtrip,
    wait_listening,
    wait_status,
    wait_until,
    zombies_of,
)

from myecho.bench.harness import free_port


def spawner_of(server: Server) -> int:
    """The fork model's spawner: the parent's only child while it is idle."""

    def started() -> int | None:
        children = children_of(server.proc.pid)
        if len(children) == 1 and b"spawner.py" in Path(f"/proc/{children[0]}/cmdline").read_bytes():
            return children[0]
        return None

    return int(wait_until(started, what="the spawner, started"))


def wait_for_spares(spawner: int, count: int) -> list[int]:
    def settled() -> list[int] | None:
        spares = children_of(spawner)
        return spares if len(spares) == count else None

    return wait_until(settled, what=f"{count} spares")


@pytest.mark.parametrize("model", ["fork", "fork-classic", "c"])
def test_no_zombies_after_hundreds_of_connections(serve: ServeFactory, model: str) -> None:
    server = serve(model)
    for number in range(300):
        with server.connect() as sock:
            assert exchange(sock, b"%d" % number) == b"%d" % number
    # Classic fork and C: no child left. With spares: the spawner, and the
    # four spares it keeps ready, nothing else; no zombie anywhere.
    expected = {"fork": 5}.get(model, 0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (
        any(zombies_of(pid) for pid in [server.proc.pid, *descendants_of(server.proc.pid)])
        or len(descendants_of(server.proc.pid)) != expected
    ):
        time.sleep(0.05)
    assert [zombies_of(pid) for pid in [server.proc.pid, *descendants_of(server.proc.pid)]] == [[]] * (expected + 1)
    assert len(descendants_of(server.proc.pid)) == expected


@pytest.mark.parametrize("model", ["fork", "fork-classic"])
def test_max_children_queues_instead_of_forking(serve: ServeFactory, model: str) -> None:
    server = serve(model, "--max-children", "3")
    held = [server.connect() for _ in range(3)]
    for sock in held:
        assert roundtrip(sock, b"held") == b"held"
    waiting = server.connect()  # accepted by the kernel, not yet by the parent
    waiting.sendall(b"queued")
    waiting.settimeout(0.5)
    with pytest.raises(TimeoutError):
        waiting.recv(10)
    # Three children serve; spares count against the limit too, so none waits.
    serving = children_of(spawner_of(server)) if model == "fork" else children_of(server.proc.pid)
    assert len(serving) == 3
    held.pop().close()
    waiting.settimeout(10)
    assert waiting.recv(10) == b"queued"
    for sock in [*held, waiting]:
        sock.close()


@pytest.mark.parametrize("model", ["fork", "fork-classic"])
def test_children_die_with_the_parent(serve: ServeFactory, model: str) -> None:
    server = serve(model)
    sock = server.connect()
    assert roundtrip(sock, b"a") == b"a"
    expected = 6 if model == "fork" else 1  # with spares: the spawner, the busy one and four spares
    family = wait_until(
        lambda: (found := descendants_of(server.proc.pid)) and len(found) == expected and found,
        what=f"{expected} children",
    )
    server.proc.kill()
    server.proc.wait()

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_until(lambda: all(gone(pid) for pid in family), what="every child gone")
    sock.settimeout(5)
    assert sock.recv(10) == b""  # the busy child died: the client sees the connection end
    sock.close()


def test_spares_are_handed_connections_and_replaced(serve: ServeFactory) -> None:
    server = serve("fork")
    spawner = spawner_of(server)
    spares = wait_for_spares(spawner, 4)
    sock = server.connect()
    assert roundtrip(sock, b"first") == b"first"
    # A spare serves it (the parent forked nothing) and a new one replaces it.
    assert children_of(server.proc.pid) == [spawner]
    after = wait_for_spares(spawner, 5)
    assert set(spares) < set(after)
    sock.close()

    # The oldest spare had the connection, and exited with it.
    def without_the_first() -> list[int] | None:
        left = children_of(spawner)
        return left if spares[0] not in left else None

    final = wait_until(without_the_first, what="the serving spare gone")
    assert set(final) == set(after) - {spares[0]}


def test_reload_changes_the_number_of_spares(serve: ServeFactory, tmp_path: Path) -> None:
    config = tmp_path / "myecho"
    config.write_text("MYECHO_SPARE_CHILDREN=4\n")
    server = serve("fork", "--config", str(config))
    spawner = spawner_of(server)
    wait_for_spares(spawner, 4)
    config.write_text("MYECHO_SPARE_CHILDREN=1\n")
    server.signal(signal.SIGHUP)
    wait_for_spares(spawner, 1)
    with server.connect() as sock:
        assert exchange(sock, b"one spare") == b"one spare"
    assert server.stop() == 0


def test_a_dead_spawner_means_forking_after_accept(serve: ServeFactory) -> None:
    server = serve("fork")
    spawner = spawner_of(server)
    spares = wait_for_spares(spawner, 4)
    os.kill(spawner, signal.SIGKILL)
    wait_until(lambda: "the spawner died" in server.stderr, what="the log line")
    for pid in spares:  # they die with it
        wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), what=f"spare {pid} gone")
    for number in range(20):
        with server.connect() as sock:
            assert exchange(sock, b"%d" % number) == b"%d" % number
    assert server.stop() == 0


def test_children_only_report_figures_not_to_systemd(serve: ServeFactory) -> None:
    server = serve("fork")
    for _ in range(5):
        with server.connect() as sock:
            assert exchange(sock, b"12345") == b"12345"
    assert server.notify is not None
    status = server.notify.wait_for("STATUS", None)
    deadline = time.monotonic() + 5
    while "5 served, 5 messages, 25 bytes" not in status.get("STATUS", "") and time.monotonic() < deadline:
        status = server.notify.receive(2) or {}
    assert "0 open, 5 served, 5 messages, 25 bytes echoed" in status["STATUS"]
    assert server.stop() == 0
    senders = {m.get("MAINPID") for m in server.notify.messages if "MAINPID" in m}
    assert senders == {str(server.proc.pid)}


def test_daemon_mode_detaches_and_writes_a_pidfile(tmp_path: Path) -> None:
    port = free_port()
    pidfile = tmp_path / "myecho.pid"
    log = tmp_path / "myecho.log"
    argv = [
        command("myecho"),
        "serve",
        "fork",
        "--port",
        str(port),
        "--daemon",
        "--pidfile",
        str(pidfile),
        "--log-file",
        str(log),
    ]
    try:
        result = subprocess.run(argv, timeout=10)
        assert result.returncode == 0  # the shell gets its prompt back
        wait_listening(port)  # bound before detaching; the pidfile and log come after
        wait_until(lambda: log.exists() and "serving on" in log.read_text(), what="the daemon's log line")
        pid = int(pidfile.read_text())
        # A session of its own, and not its leader: it can never get a terminal back.
        assert os.getsid(pid) not in (os.getsid(0), pid)
        assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert exchange(sock, b"daemon") == b"daemon"
    finally:  # the daemon is nobody's child: find it by its command line, whatever failed
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if str(pidfile).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGTERM)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 10
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists()
    assert "stopped" in log.read_text()


def test_spares_are_topped_up_after_a_quiet_moment_or_when_few_are_left() -> None:
    """A replacement forked at once would take its copy-on-write faults
    during the first exchanges of the connection it replaces: the parent
    waits for REPLENISH_DELAY without a handover, unless fewer than half
    of the spares are left."""
    from myecho.models import fork
    from myecho.models.children import Children

    # Only the policy: no runtime, whose signal handlers would stay in this process.
    server = object.__new__(fork.ForkServer)
    server.children = Children()
    left, right = socket.socketpair()
    try:
        for pid in (1, 2, 3):  # one of four was just handed over
            server.children.add_spare(pid, left)
        server.last_handover = time.monotonic()
        assert 0 < server.replenish_in(4) <= fork.REPLENISH_DELAY
        server.last_handover -= fork.REPLENISH_DELAY
        assert server.replenish_in(4) == 0
        server.last_handover = time.monotonic()
        server.children.spares.popitem()
        assert server.replenish_in(4) > 0  # two of four: still half
        server.children.spares.popitem()
        assert server.replenish_in(4) == 0  # one of four: at once
    finally:
        left.close()
        right.close()


def test_a_killed_spawner_takes_no_live_connection_with_it(serve: ServeFactory) -> None:
    server = serve("fork", "--spare-children", "2")
    spawner = spawner_of(server)
    spares = wait_for_spares(spawner, 2)
    sock = server.connect()
    assert roundtrip(sock, b"before") == b"before"
    busy = spares[0]  # the oldest spare took it
    os.kill(spawner, signal.SIGKILL)
    wait_until(lambda: "the spawner died" in server.stderr, what="the log line")
    # The busy child lives on, adopted by the parent (a subreaper), and echoes.
    wait_until(lambda: busy in children_of(server.proc.pid), what="the busy child adopted")
    for number in range(5):
        assert roundtrip(sock, b"after %d" % number) == b"after %d" % number
    with server.connect() as other:  # new ones: forked by the parent
        assert exchange(other, b"new") == b"new"
    # It still dies with the server.
    server.proc.kill()
    server.proc.wait()
    wait_until(
        lambda: (
            not Path(f"/proc/{busy}").exists()
            or Path(f"/proc/{busy}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        ),
        what="the child gone",
    )
    sock.settimeout(5)
    assert sock.recv(10) == b""
    sock.close()


def test_a_stopped_spawner_means_forking_after_accept(serve: ServeFactory) -> None:
    server = serve("fork", "--spare-children", "2")
    spawner = spawner_of(server)
    wait_for_spares(spawner, 2)
    os.kill(spawner, signal.SIGSTOP)
    try:
        held = []
        for number in range(6):  # two spares, then the parent's own forks
            sock = server.connect(timeout=5)
            assert roundtrip(sock, b"%d" % number) == b"%d" % number
            held.append(sock)
        assert "the spawner has not answered" in server.stderr
        assert len(children_of(server.proc.pid)) >= 5  # the spawner and four forked by the parent
        for sock in held:
            sock.close()
    finally:
        os.kill(spawner, signal.SIGCONT)
    wait_until(lambda: "the spawner answers again" in server.stderr, what="the spawner back")
    with server.connect() as sock:
        assert exchange(sock, b"spare again") == b"spare again"


@pytest.mark.parametrize("model", ["fork", "fork-classic"])
def test_status_counts_bytes_while_connections_are_open(serve: ServeFactory, model: str) -> None:
    server = serve(model)
    sock = server.connect()
    for message in (b"one", b"two", b"three"):
        assert roundtrip(sock, message) == message
        time.sleep(0.05)  # three reads, not one
    status = wait_status(server, "1 open, 1 served, 3 messages, 11 bytes echoed")
    assert status.startswith("1 open")
    sock.close()
    wait_status(server, "0 open, 1 served, 3 messages, 11 bytes echoed")


def test_without_max_children_the_limit_fits_the_machine(serve: ServeFactory) -> None:
    server = serve("fork")
    line = wait_until(
        lambda: next((x for x in server.stderr.splitlines() if "max-children:" in x), None),
        what="the max-children line",
    )
    count = int(line.split("max-children: ")[1].split(",")[0])
    assert count > 1000  # the old fixed default, well below what this machine holds
    assert "as many as fit (" in line


def test_a_child_costs_little_more_than_the_interpreter_floor(serve: ServeFactory) -> None:
    """A child's memory is what it writes after its fork: over 200 open
    connections each one's PSS (its own pages, its share of the others)
    stays far below what a child that warms up, loads ctypes or builds
    socket objects costs (about 780 kB on CPython 3.11)."""
    server = serve("fork")
    spawner = spawner_of(server)
    held = []
    try:
        for number in range(200):
            sock = server.connect()
            assert roundtrip(sock, b"%d" % number) == b"%d" % number
            held.append(sock)
        children = children_of(spawner)
        assert len(children) >= 200
        pss = []
        for pid in children:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            pss.append(int(next(line for line in rollup if line.startswith("Pss:")).split()[1]))
        assert sum(pss) / len(pss) < 560, f"mean PSS per child {sum(pss) / len(pss):.0f} kB"
    finally:
        for sock in held:
            sock.close()
