"""Drive the load generators: the C epoll client, for TCP and for zmq.

``myecho-load --protocol zmtp`` speaks ZeroMQ's wire protocol itself, as a
REQ socket: a pyzmq client costs about as much CPU per round trip as the
zmq model it measures (and most of a 1,000-connection burst is pyzmq
creating sockets), so it would measure itself. The pyzmq client
(``myecho.bench.zmqload``, ``myecho-bench --zmq-client pyzmq``) is kept to
cross-check: both speak the same command line and print one JSON object per
line (see c/bench/myecho-load.c), so a scenario never cares which one
runs.
The load generator runs in processes of its own: its CPU is not ours, and
the ramp can spread connections over several of them, each with its own
file-descriptor limit and its own source addresses (127.0.0.x).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

from myecho.reference import program

Json = dict[str, Any]
#: The clients of the zmq models: myecho-load speaking ZMTP, or pyzmq REQ sockets.
ZMQ_CLIENTS = ("zmtp", "pyzmq")


class LoadError(RuntimeError):
    """The load generator itself failed (not the server under test)."""


def command(protocol: str, mode: str, host: str, port: int, **options: object) -> list[str]:
    """argv of the load generator for ``protocol``: "tcp", or a zmq client by
    name, "zmtp" or "pyzmq" (``client_for`` picks one for a model)."""
    if protocol == "pyzmq":
        argv = [sys.executable, "-m", "myecho.bench.zmqload", mode]
    elif protocol == "zmtp":
        argv = [str(program("myecho-load")), mode, "--protocol", "zmtp"]
    elif protocol == "tcp":
        argv = [str(program("myecho-load")), mode]
    else:
        raise ValueError(f"no load generator {protocol!r}: tcp, zmtp or pyzmq")
    for name, value in options.items():
        if value is not None and value != "":
            argv += [f"--{name}", str(value)]
    return [*argv, host, str(port)]


def client_for(protocol: str, zmq_client: str) -> str:
    """The load generator of a model speaking ``protocol`` ("tcp" or "zmq")."""
    return zmq_client if protocol == "zmq" else protocol


def _parse(line: str, argv: list[str], stderr: str = "") -> Json:
    try:
        result: Json = json.loads(line)
    except json.JSONDecodeError:
        raise LoadError(f"{argv[0]} {argv[1]}: no result ({stderr.strip() or line.strip() or 'no output'})") from None
    return result


def run(protocol: str, mode: str, host: str, port: int, limit: float, **options: object) -> Json:
    """Run one single/rr measurement to completion; its JSON result."""
    argv = command(protocol, mode, host, port, **options)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=limit, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise LoadError(f"{mode} did not finish within {limit:.0f} s") from None
    lines = done.stdout.strip().splitlines()
    return _parse(lines[-1] if lines else "", argv, done.stderr)


def round_trips(
    protocol: str, host: str, port: int, limit: float, on_start: Callable[[], None], **options: object
) -> Json:
    """A closed-loop ``rr`` run; ``on_start()`` is called when its measured window opens."""
    argv = command(protocol, "rr", host, port, **options)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    timer = threading.Timer(limit, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            result = _parse(line, argv)
            if result.get("event") == "start":
                on_start()
            else:
                proc.wait()  # it exits by itself right after its result
                return result
        raise LoadError(f"{argv[0]} rr: no result (exit status {proc.wait()})")
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


def burst(
    protocol: str, host: str, port: int, conns: int, limit: float, while_open: Callable[[Json], None], **options: object
) -> Json:
    """Open ``conns`` connections at once and echo on each; while they are
    still open, ``while_open(result)`` may sample the server."""
    argv = command(protocol, "burst", host, port, conns=conns, **options)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        result = _parse(proc.stdout.readline(), argv)
        while_open(result)
        proc.stdin.write("done\n")
        proc.stdin.flush()
        proc.wait(limit)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdin.close()
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    return result


class Holder:
    """One load-generator process in ``hold`` mode: the ramp's hands."""

    def __init__(self, protocol: str, host: str, port: int, sources: list[str], **options: object) -> None:
        self.argv = command(protocol, "hold", host, port, src=",".join(sources), **options)
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.live = 0

    @property
    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        return self.proc.stdin, self.proc.stdout

    def send(self, line: str) -> None:
        """Start a command; ``result()`` collects it (so several holders work at once)."""
        stdin, _ = self._pipes
        stdin.write(line + "\n")
        stdin.flush()

    def result(self) -> Json:
        _, stdout = self._pipes
        result = _parse(stdout.readline(), self.argv)
        self.live = int(result.get("live", self.live))
        return result

    def close(self) -> None:
        stdin, stdout = self._pipes
        try:
            stdin.write("quit\n")
            stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        stdout.close()
