"""Clients run INSIDE the test container (Debian's python3 + python3-zmq).

The container has only its own loopback, so the clients must run there;
test_package.py copies this file in and runs ``python3 probe.py COMMAND``.
Each command prints one JSON object on stdout and exits 0 if every
exchange was byte-exact, 1 otherwise.  Standard library only (plus zmq for
the zmq command): it must run on a bare Debian with the package installed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time


def echo_once(port: int, payload: bytes, timeout: float) -> bytes:
    """One connection: send payload, half-close, read until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def cmd_tcp(args: argparse.Namespace) -> dict[str, object]:
    """One round trip, with bytes a line-based echo would get wrong."""
    payload = b"myecho probe \x00\xff\r\n" + os.urandom(args.size)
    got = echo_once(args.port, payload, args.timeout)
    return {"ok": got == payload, "sent": len(payload), "received": len(got)}


def cmd_zmq(args: argparse.Namespace) -> dict[str, object]:
    """The talk's REQ/REP exchange: one request, its reply."""
    import zmq

    context = zmq.Context()
    req = context.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, int(args.timeout * 1000))
    req.connect(f"tcp://127.0.0.1:{args.port}")
    replies = []
    try:
        for number in range(args.count):
            request = b"hello %d \x00\xff" % number
            req.send(request)
            replies.append(req.recv() == request)
    except zmq.Again:
        replies.append(False)
    finally:
        req.close()
        context.term()
    return {"ok": all(replies) and len(replies) == args.count, "replies": len(replies)}


def cmd_concurrent(args: argparse.Namespace) -> dict[str, object]:
    """N connections open at the same time, then each one echoes."""
    socks, errors = [], []
    for _ in range(args.count):
        try:
            socks.append(socket.create_connection(("127.0.0.1", args.port), timeout=args.timeout))
        except OSError as error:
            errors.append(f"connect: {error}")
    # Every connection is open now; only then does any of them talk.
    echoed = 0
    for number, sock in enumerate(socks):
        payload = b"connection %d\n" % number
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            got = b""
            while data := sock.recv(65536):
                got += data
            echoed += got == payload
            if got != payload:
                errors.append(f"connection {number}: got {got!r}")
        except OSError as error:
            errors.append(f"connection {number}: {error}")
        finally:
            sock.close()
    return {"ok": echoed == args.count, "echoed": echoed, "errors": errors[:10]}


def cmd_hold(args: argparse.Namespace) -> dict[str, object]:
    """Connect, stay idle for SECONDS (the server may begin to stop), then echo."""
    with socket.create_connection(("127.0.0.1", args.port), timeout=args.timeout) as sock:
        time.sleep(args.seconds)
        payload = b"held for %.1f s\n" % args.seconds
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while data := sock.recv(65536):
            got += data
    return {"ok": got == payload, "received": got.decode(errors="replace")}


def cmd_stream(args: argparse.Namespace) -> dict[str, object]:
    """New connections back to back for SECONDS (or until --stop-file exists):
    count those that fail."""
    stop = time.monotonic() + args.seconds
    results = {"echoed": 0, "refused": 0, "failed": 0}
    errors: list[str] = []
    lock = threading.Lock()

    def worker(number: int) -> None:
        sequence = 0
        while time.monotonic() < stop and not (args.stop_file and os.path.exists(args.stop_file)):
            payload = b"stream %d %d\n" % (number, sequence)
            sequence += 1
            try:
                outcome = "echoed" if echo_once(args.port, payload, args.timeout) == payload else "failed"
            except ConnectionRefusedError:
                outcome = "refused"
            except OSError as error:
                outcome = "failed"
                with lock:
                    errors.append(repr(error))
            with lock:
                results[outcome] += 1
            time.sleep(args.pause)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ok = results["refused"] == 0 and results["failed"] == 0 and results["echoed"] > 0
    return {"ok": ok, **results, "errors": errors[:10]}


def cmd_burst(args: argparse.Namespace) -> dict[str, object]:
    """COUNT clients connect at the same moment (a barrier), each sends one
    line and reads its echo: how many were echoed, and how many the server
    closed or refused.  ok when the burst ran; the caller judges the counts."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = {"echoed": 0, "closed": 0, "refused": 0, "failed": 0}
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(args.count)

    def client(number: int) -> None:
        payload = b"burst %d\n" % number
        outcome = "failed"
        try:
            barrier.wait(30)
            got = echo_once(args.port, payload, args.timeout)
            outcome = "echoed" if got == payload else "closed"
        except ConnectionRefusedError:
            outcome = "refused"
        except (ConnectionResetError, BrokenPipeError):
            outcome = "closed"
        except (OSError, threading.BrokenBarrierError) as error:
            outcome = "failed"
            with lock:
                errors.append(repr(error))
        with lock:
            results[outcome] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sample = sorted(set(errors))[:5]
    return {"ok": sum(results.values()) == args.count, **results, "errors": sample}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeout", type=float, default=10.0)
    commands = parser.add_subparsers(dest="command", required=True)
    tcp = commands.add_parser("tcp")
    tcp.add_argument("port", type=int)
    tcp.add_argument("--size", type=int, default=100_000)
    zmq = commands.add_parser("zmq")
    zmq.add_argument("port", type=int)
    zmq.add_argument("--count", type=int, default=3)
    concurrent = commands.add_parser("concurrent")
    concurrent.add_argument("port", type=int)
    concurrent.add_argument("--count", type=int, default=50)
    hold = commands.add_parser("hold")
    hold.add_argument("port", type=int)
    hold.add_argument("--seconds", type=float, default=1.5)
    stream = commands.add_parser("stream")
    stream.add_argument("port", type=int)
    stream.add_argument("--seconds", type=float, default=4.0)
    stream.add_argument("--clients", type=int, default=4)
    stream.add_argument("--pause", type=float, default=0.005)
    stream.add_argument("--stop-file", help="stop early once this file exists")
    burst = commands.add_parser("burst")
    burst.add_argument("port", type=int)
    burst.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    result = {
        "tcp": cmd_tcp,
        "zmq": cmd_zmq,
        "concurrent": cmd_concurrent,
        "hold": cmd_hold,
        "stream": cmd_stream,
        "burst": cmd_burst,
    }[args.command](args)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
