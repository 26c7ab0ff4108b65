"""The fork model's table of children: what each state means to the parent."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from myecho.models import children as children_module
from myecho.models.children import CHILD_MEMORY, PARENT_FDS, Children, fitting


@pytest.fixture
def channels() -> Iterator[list[socket.socket]]:
    """Parent ends of spare channels; the other ends say whether they were closed."""
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def spare(children: Children, pid: int, channels: list[socket.socket]) -> socket.socket:
    """Add a spare; return the spare's end of its channel."""
    ours, theirs = socket.socketpair()
    channels.append(theirs)
    children.add_spare(pid, ours)
    return theirs


def closed(sock: socket.socket) -> bool:
    sock.settimeout(1)
    return sock.recv(1) == b""


def test_spares_are_taken_oldest_first_and_then_serve(channels: list[socket.socket]) -> None:
    children = Children()
    children.asking(2)
    for pid in (10, 11):
        spare(children, pid, channels)
    assert children.asked == 0
    taken = children.take()
    pid, channel = next(taken)
    channel.close()
    assert pid == 10
    assert children.serving == {10} and list(children.spares) == [11]
    assert len(children) == 2 and 10 in children and 11 in children
    assert children.exited(10)  # a connection ended
    assert not children.exited(11)  # a spare died waiting: no connection
    assert len(children) == 0 and 11 not in children
    assert closed(channels[1])  # its channel closed with it


def test_a_spare_that_fails_its_handover_is_retiring(channels: list[socket.socket]) -> None:
    children = Children()
    spare(children, 20, channels)
    spare(children, 21, channels)
    taken = children.take()
    pid, channel = next(taken)
    channel.close()
    children.failed(pid)
    pid, channel = next(taken)  # the next one takes the connection
    channel.close()
    assert (pid, children.retiring, children.serving) == (21, {20}, {21})
    assert not children.exited(20)  # its exit ends no connection
    assert children.retiring == set()


def test_retire_sends_eof_to_the_newest_spares(channels: list[socket.socket]) -> None:
    children = Children()
    ends = [spare(children, pid, channels) for pid in (30, 31, 32)]
    children.retire(1)
    assert list(children.spares) == [30] and children.retiring == {31, 32}
    assert closed(ends[1]) and closed(ends[2])
    assert len(children) == 3  # they count until they are gone
    children.close_channels()


def test_a_lost_spawner_leaves_only_the_serving_and_the_forked(channels: list[socket.socket]) -> None:
    children = Children()
    ends = [spare(children, pid, channels) for pid in (40, 41)]
    next(children.take())[1].close()
    children.forked.add(50)
    children.asking(3)
    children.spawner_lost()
    assert closed(ends[1])  # the idle spare sees EOF and exits
    assert (children.serving, children.forked, children.asked, len(children)) == ({40}, {50}, 0, 2)
    assert children.exited(50) and children.exited(40)


def test_overdue_after_the_deadline_and_no_longer_once_a_spare_comes(channels: list[socket.socket]) -> None:
    children = Children()
    assert not children.overdue()
    children.asking(1)
    assert not children.overdue()
    children.waited_since -= 10
    assert children.overdue()
    children.late = True
    assert spare(children, 60, channels) is not None
    assert not children.overdue() and not children.late
    children.close_channels()


def test_the_default_limit_is_what_the_machine_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each bound in turn wins when it is the lowest: the fd limit, memory, pid_max, the cgroup's pids.max."""
    numbers = {"pid_max": 32768, "pids.max": 0}
    monkeypatch.setattr(children_module, "_meminfo", lambda field: 8 << 30)  # 8 GiB available
    monkeypatch.setattr(children_module, "_number", lambda path: numbers[path.name])
    assert fitting(4, 128, 1000) == (1000 - PARENT_FDS - 128 - 4, "the fd limit, 1000")
    assert fitting(4, 128, 10**9) == ((8 << 30) // 2 // CHILD_MEMORY, "half of MemAvailable, 8192 MiB")
    numbers["pid_max"] = 6000
    assert fitting(4, 128, 10**9) == (6000 - 2000 - 4, "pid_max, 6000")
    numbers["pids.max"] = 500  # systemd's TasksMax
    assert fitting(4, 128, 10**9) == (500 - 16 - 4, "the cgroup's pids.max, 500")
