"""The blocking echo loop shared by the models that give a connection a
process of its own (inetd, fork).

It imports only ``os``: the inetd model pays for every import at every
connection, since the interpreter starts afresh each time.
"""

import os

CHUNK = 65536


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte: a socket or a pipe may take only part of a write."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def echo_fds(rfd: int, wfd: int) -> tuple[int, int]:
    """Copy ``rfd`` to ``wfd`` until EOF, byte for byte; no line handling.

    Returns (bytes, reads) so callers can report figures. Raises OSError on
    a broken peer; the caller decides whether that is worth a log line.
    """
    total = reads = 0
    while True:
        data = os.read(rfd, CHUNK)
        if not data:
            return total, reads
        write_all(wfd, data)
        total += len(data)
        reads += 1
