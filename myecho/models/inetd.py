"""The inetd model: one connection on stdin/stdout, then exit.

xinetd (or systemd with ``Accept=yes``, the modern inetd) accepts the
connection and starts this program with the socket as fds 0 and 1. The
interpreter starts afresh for every connection, so start-up *is* the
latency of the first exchange: this path imports nothing but ``os`` (even
``socket`` would cost milliseconds) and never writes to stderr, which under
xinetd is the client's socket too. At EOF it simply exits: that closes the
last copy of the socket, and the client reads EOF after every byte.
"""

import sys

from myecho.echo import echo_fds


def main() -> int:
    """Echo stdin to stdout, unbuffered and binary-safe, until EOF."""
    try:
        echo_fds(0, 1)
    except ConnectionError:
        return 0  # the client left without reading: its business, not an error
    except OSError:
        return 1  # nowhere safe to say why: stderr may be the client's socket
    return 0


if __name__ == "__main__":
    sys.exit(main())
