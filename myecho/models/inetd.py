"""The inetd model: one connection on stdin/stdout, then exit.

xinetd (or systemd with ``Accept=yes``, the modern inetd) accepts the
connection and starts this program with the socket as fds 0 and 1. The
interpreter starts afresh for every connection, so start-up *is* the
latency of the first exchange. Hence this path imports nothing but ``os``
(even ``socket`` would cost milliseconds) and never writes to stderr,
which under xinetd is the client's socket too. At EOF it simply exits:
that closes the last copy of the socket, and the client reads EOF after
every byte.

Fastest start: run this file itself with ``python3 -I -S`` (no site
processing: about 12 ms instead of 25-30 ms for a console script), as the
shipped xinetd file and ``myecho-inetd@.service`` do. ``myecho serve
inetd`` does the same job with the full start-up.
"""

import sys


def main() -> int:
    """Echo stdin to stdout, unbuffered and binary-safe, until EOF."""
    from myecho.echo import echo_fds

    try:
        echo_fds(0, 1)
    except ConnectionError:
        return 0  # the client left without reading: its business, not an error
    except OSError:
        return 1  # nowhere safe to say why: stderr may be the client's socket
    return 0


if __name__ == "__main__":
    # Run as a file under ``-I -S``: site-packages is not on sys.path, so
    # put the directory that holds the myecho package there ourselves.
    from os.path import abspath, dirname

    sys.path.insert(0, dirname(dirname(dirname(abspath(__file__)))))
    sys.exit(main())
