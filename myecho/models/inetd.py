"""The inetd model: one connection on stdin/stdout, then exit.

xinetd (or systemd with ``Accept=yes``, the modern inetd) accepts the
connection and starts this program with the socket as fds 0 and 1. The
interpreter starts afresh for every connection, so start-up *is* the
delay of the first exchange. Hence this module imports ``posix`` alone, a
module built into the interpreter (``os`` is a Python module on top of it,
``socket`` or the rest of the ``myecho`` package cost more still), and
leaves with ``posix._exit``: nothing is buffered, so the interpreter's
clean-up would only spend time. It never writes to stderr, which under
xinetd is the client's socket too. At EOF it exits: that closes the last
copy of the socket, and the client reads EOF after every byte it sent.

Fastest start: run this file itself with ``python3 -I -S`` (no site
processing), as the shipped xinetd file and ``myecho-inetd@.service`` do;
it needs nothing from sys.path. ``myecho serve inetd`` goes to ``serve()``
before importing anything else, but pays for the interpreter's site
processing.
"""

import posix

CHUNK = 65536


def echo(rfd: int = 0, wfd: int = 1) -> int:
    """Copy ``rfd`` to ``wfd`` byte for byte until EOF; the exit status.

    0 at EOF, or when the client left without reading (its business, not an
    error); 1 on any other failure, with nowhere safe to say why.
    """
    read, write = posix.read, posix.write
    try:
        while data := read(rfd, CHUNK):
            written = write(wfd, data)
            if written < len(data):  # a socket or a pipe may take only part
                view = memoryview(data)[written:]
                while view:
                    view = view[write(wfd, view) :]
    except ConnectionError:
        return 0
    except OSError:
        return 1
    return 0


def main() -> int:
    """Serve the connection on stdin/stdout; the exit status."""
    return echo(0, 1)


def serve() -> None:
    """Serve stdin/stdout, then leave at once without the interpreter's clean-up."""
    posix._exit(echo(0, 1))


if __name__ == "__main__":
    serve()
