"""The fork model's spawner, driven over its control socket as the parent does."""

from __future__ import annotations

import mmap
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import children_of, wait_until

from myecho.models.spawner import HANDOVER, MESSAGE, SLOT, SLOT_SIZE, Spawner, new_slots


@dataclass
class Link:
    pid: int
    control: socket.socket
    slots: mmap.mmap
    reaped: bool = False

    def ask(self) -> tuple[int, socket.socket]:
        """One spare: its pid and the parent's end of its channel."""
        self.control.send(MESSAGE.pack(b"F", 0, 0))
        return self.expect(b"S")

    def expect(self, kind: bytes) -> tuple[int, socket.socket]:
        self.control.settimeout(10)
        data, fds, _, _ = socket.recv_fds(self.control, MESSAGE.size, 1)
        got, pid, _ = MESSAGE.unpack(data)
        assert got == kind
        return pid, socket.socket(fileno=fds[0]) if fds else socket.socket()


@pytest.fixture
def spawner() -> Iterator[Link]:
    """A spawner forked from the test (so that coverage sees it), not exec'd."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    slots_fd, slots = new_slots()
    me = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ours.close()
            code = Spawner(theirs, slots_fd, me).run()
        finally:
            os._exit(code)
    theirs.close()
    link = Link(pid, ours, slots)
    yield link
    ours.close()
    if not link.reaped:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    os.close(slots_fd)


def test_a_spare_echoes_the_connection_it_is_handed_then_exits(spawner: Link) -> None:
    pid, channel = spawner.ask()
    assert pid in children_of(spawner.pid)
    client, server_end = socket.socketpair()
    with channel, server_end:
        socket.send_fds(channel, [HANDOVER.pack(7)], [server_end.fileno()])
    client.sendall(b"hello, spare")
    client.shutdown(socket.SHUT_WR)
    client.settimeout(10)
    received = b""
    while chunk := client.recv(100):
        received += chunk
    assert received == b"hello, spare"
    activity, nbytes, reads = SLOT.unpack_from(spawner.slots, 7 * SLOT_SIZE)  # its figures, in its slot
    assert (nbytes, reads) == (12, 1)
    assert 0 < time.monotonic() - activity < 10
    assert spawner.expect(b"X")[0] == pid  # reaped by the spawner, reported
    client.close()


def test_a_retired_spare_exits(spawner: Link) -> None:
    pid, channel = spawner.ask()
    channel.close()  # EOF: the parent has no connection for it
    assert spawner.expect(b"X")[0] == pid


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
