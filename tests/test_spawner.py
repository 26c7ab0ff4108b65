"""The fork model's spawner, driven over its control socket as the parent does."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import children_of, wait_until

from myecho.models.spawner import MESSAGE, REPORT, Spawner


@dataclass
class Link:
    pid: int
    control: socket.socket
    reports: int
    reaped: bool = False

    def ask(self) -> tuple[int, socket.socket]:
        """One spare: its pid and the parent's end of its channel."""
        self.control.send(MESSAGE.pack(b"F", 0))
        return self.expect(b"S")

    def expect(self, kind: bytes) -> tuple[int, socket.socket]:
        self.control.settimeout(10)
        data, fds, _, _ = socket.recv_fds(self.control, MESSAGE.size, 1)
        got, pid = MESSAGE.unpack(data)
        assert got == kind
        return pid, socket.socket(fileno=fds[0]) if fds else socket.socket()


@pytest.fixture
def spawner() -> Iterator[Link]:
    """A spawner forked from the test (so that coverage sees it), not exec'd."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reports_r, reports_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ours.close()
            code = Spawner(theirs, reports_w).run()
        finally:
            os._exit(code)
    theirs.close()
    os.close(reports_w)
    link = Link(pid, ours, reports_r)
    yield link
    ours.close()
    if not link.reaped:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    os.close(reports_r)


def test_a_spare_echoes_the_connection_it_is_handed_then_exits(spawner: Link) -> None:
    pid, channel = spawner.ask()
    assert pid in children_of(spawner.pid)
    client, server_end = socket.socketpair()
    with channel, server_end:
        socket.send_fds(channel, [b"c"], [server_end.fileno()])
    client.sendall(b"hello, spare")
    client.shutdown(socket.SHUT_WR)
    client.settimeout(10)
    received = b""
    while chunk := client.recv(100):
        received += chunk
    assert received == b"hello, spare"
    assert REPORT.unpack(os.read(spawner.reports, REPORT.size)) == (12, 1)
    assert spawner.expect(b"X")[0] == pid  # reaped by the spawner, reported
    client.close()


def test_a_retired_spare_exits_without_a_report(spawner: Link) -> None:
    pid, channel = spawner.ask()
    channel.close()  # EOF: the parent has no connection for it
    assert spawner.expect(b"X")[0] == pid
    os.set_blocking(spawner.reports, False)
    with pytest.raises(BlockingIOError):
        os.read(spawner.reports, REPORT.size)


def test_spares_die_with_the_spawner(spawner: Link) -> None:
    spares = [spawner.ask() for _ in range(3)]
    os.kill(spawner.pid, signal.SIGKILL)
    os.waitpid(spawner.pid, 0)
    spawner.reaped = True
    for pid, channel in spares:
        wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), what=f"spare {pid} gone")
        channel.close()


def test_eof_from_the_parent_stops_the_spawner(spawner: Link) -> None:
    spawner.control.shutdown(socket.SHUT_RDWR)
    _, status = os.waitpid(spawner.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    spawner.reaped = True
