"""``myecho client``: the talk's telnet session, scriptable.

TCP: stdin goes out as it comes and whatever the server sends is written
to stdout; at the end of stdin we half-close and keep reading until the
server closes, so every echoed byte is printed. ZeroMQ: each stdin line is
one REQ request and its reply is printed (the talk's PHP client, in a loop).
"""

import os
import socket
import sys
import threading

from myecho.core.echo import CHUNK, write_all


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _send_stdin(sock: socket.socket) -> None:
    try:
        while data := os.read(sys.stdin.fileno(), CHUNK):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def tcp_client(address: str, timeout: float) -> int:
    host, port = split_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as error:
        print(f"myecho client: cannot connect to {address}: {error.strerror or error}", file=sys.stderr)
        return 1
    sender = threading.Thread(target=_send_stdin, args=(sock,), daemon=True)
    sender.start()
    out = sys.stdout.buffer
    try:
        while data := sock.recv(CHUNK):
            write_all(out.fileno(), data)
    except TimeoutError:
        print(f"myecho client: no answer from {address} in {timeout:g} s", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"myecho client: {error.strerror or error}", file=sys.stderr)
        return 1
    finally:
        sock.close()
    return 0


def zmq_client(url: str, timeout: float) -> int:
    import zmq

    if "://" not in url:
        url = "tcp://" + url
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    req = context.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:PORT too; IPv4 addresses still work
    req.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    try:
        req.connect(url)
        for line in sys.stdin.buffer:
            req.send(line)
            sys.stdout.buffer.write(req.recv())
            sys.stdout.buffer.flush()
    except zmq.Again:
        print(f"myecho client: no answer from {url} in {timeout:g} s", file=sys.stderr)
        return 1
    except zmq.ZMQError as error:
        print(f"myecho client: {url}: {error}", file=sys.stderr)
        return 1
    finally:
        req.close()
    return 0


def run_client(address: str, zmq: bool = False, timeout: float = 10.0) -> int:
    try:
        return zmq_client(address, timeout) if zmq else tcp_client(address, timeout)
    except ValueError as error:
        print(f"myecho client: {error}", file=sys.stderr)
        return 2
