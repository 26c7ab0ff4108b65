"""The ``myecho`` command: argument parsing only, then a model runs.

``myecho serve inetd`` runs once per connection under xinetd or systemd
``Accept=yes``, so it takes a fast path that imports nothing else: importing
argparse alone would add a large share of Python's start-up to the first
exchange, and start-up is that model's whole cost. The ``myecho`` script (bin/myecho) takes that path
before it even imports this module; ``main()`` keeps it for other callers.
Everything else goes through argparse.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs milliseconds too
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

MODEL_HELP = {
    "inetd": "one connection on stdin/stdout, then exit (xinetd, systemd Accept=yes, a pipe)",
    "fork": "a parent that accepts, one child process per connection",
    "select": "one process, one event loop (selectors: epoll), non-blocking sockets",
    "asyncio": "asyncio protocols on an event library's loop (uvloop's libuv when installed)",
    "zmq": "ZeroMQ echo for REQ and DEALER clients (a ROUTER socket)",
    "broker": "load-balancing echo: REQ clients on the frontend, workers on the backend",
    "worker": "one echo worker for a broker, on any host",
}
DEFAULT_CONFIG = "/etc/default/myecho"
EXIT_BAD_CONFIG = 78  # myecho.core.settings.EXIT_BAD_CONFIG, without importing it on the inetd path
IDLE_HELP = (
    "close a connection silent for SECONDS (default: 300; 0: never); at the connection limit, with more "
    "waiting, the idlest connection is closed first"
)
ENDPOINT_RULE = "@URL binds, >URL connects; tcp://, ipc:// (inproc:// within one process); repeatable"


def build_parser() -> argparse.ArgumentParser:
    from myecho import __version__
    from myecho.argparser import Parser
    from myecho.core.settings import BROKER_BACKEND_PORT, DEFAULT_PORTS, option_type

    parser = Parser(
        prog="myecho",
        description="An echo service (RFC 862) in every daemon model of the talk 'Démons en PHP, de inetd à ZeroMQ'.",
    )
    parser.add_argument("--version", action="version", version=f"myecho {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    serve = commands.add_parser(
        "serve",
        help="run one daemon model in the foreground until SIGTERM/SIGINT",
        description="Run one daemon model in the foreground until SIGTERM or SIGINT "
        "(graceful stop, exit 0). SIGHUP re-reads --config and reopens the log.",
    )
    models = serve.add_subparsers(dest="model", required=True, metavar="MODEL", parser_class=Parser)

    common = Parser(add_help=False)
    common.add_argument(
        "--config",
        type=_path,
        metavar="FILE",
        help="settings file (MYECHO_NAME=value lines, as /etc/default/myecho); re-read on SIGHUP",
    )
    common.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default: info")
    common.add_argument(
        "--log-file", type=_path, metavar="FILE", help="log to FILE (reopened on SIGHUP) instead of journald or stderr"
    )
    common.add_argument(
        "--graceful-timeout",
        type=option_type("graceful_timeout"),
        metavar="SECONDS",
        help="on SIGTERM, how long open connections may go on (default: 5)",
    )
    common.add_argument(
        "--daemon",
        action="store_true",
        help="detach (fork, setsid, fork) for life without systemd; never under systemd",
    )
    common.add_argument("--pidfile", type=_path, metavar="FILE", help="with --daemon: write the daemon's pid here")

    tcp = Parser(add_help=False)
    tcp.add_argument("--host", help="address to listen on (default: 127.0.0.1, this machine only)")
    tcp.add_argument("--port", type=option_type("port"), help="TCP port (default: the model's port, see the README)")
    tcp.add_argument(
        "--backlog", type=option_type("backlog"), help="listen backlog (default: 4096; the kernel caps it at somaxconn)"
    )

    workers = Parser(add_help=False)
    workers.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="N event-loop processes on the one listening socket, under a supervisor "
        "(default: 1, a single loop; 0: one per core); --max-connections is per worker",
    )

    models.add_parser("inetd", help=MODEL_HELP["inetd"], description=MODEL_HELP["inetd"] + ".")
    fork = models.add_parser(
        "fork",
        parents=[tcp, common],
        help=MODEL_HELP["fork"],
        description=MODEL_HELP["fork"] + f"; port {DEFAULT_PORTS['fork']}.",
    )
    fork.add_argument(
        "--max-children",
        type=option_type("max_children"),
        metavar="N",
        help="stop accepting while N children run (default: 0, as many as fit this machine: the least of half "
        "its MemAvailable at 512 kB per child, the open-files limit, pid_max and the cgroup's pids.max, "
        "less a margin; the log says which and how many)",
    )
    fork.add_argument(
        "--spare-children",
        type=option_type("spare_children"),
        metavar="N",
        help="children forked ahead, ready for one connection each (default: 4; 0: fork after accept, as the talk)",
    )
    fork.add_argument("--idle-timeout", type=float, metavar="SECONDS", help=IDLE_HELP)
    select = models.add_parser(
        "select",
        parents=[tcp, workers, common],
        help=MODEL_HELP["select"],
        description=MODEL_HELP["select"] + f"; port {DEFAULT_PORTS['select']}.",
    )
    select.add_argument(
        "--max-connections",
        type=option_type("max_connections"),
        metavar="N",
        help="stop accepting at N open connections (default: 19000, and the fd limit)",
    )
    select.add_argument(
        "--buffer-limit",
        type=option_type("buffer_limit"),
        metavar="BYTES",
        help="bytes held for a client that does not read before its reads pause (default: 65536)",
    )
    aio = models.add_parser(
        "asyncio",
        parents=[tcp, workers, common],
        help=MODEL_HELP["asyncio"],
        description=MODEL_HELP["asyncio"] + f"; port {DEFAULT_PORTS['asyncio']}.",
    )
    aio.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        help="the event loop (default: auto, uvloop when installed, else asyncio's own)",
    )
    aio.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="stop accepting at N open connections (default: 19000, and the fd limit)",
    )
    aio.add_argument(
        "--buffer-limit",
        type=int,
        metavar="BYTES",
        help="bytes held for a client that does not read before its reads pause (default: 65536)",
    )
    aio.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="close a connection silent that long (default: 300; 0: never)",
    )
    select.add_argument("--idle-timeout", type=float, metavar="SECONDS", help=IDLE_HELP)
    zmq = models.add_parser(
        "zmq",
        parents=[tcp, common],
        help=MODEL_HELP["zmq"],
        description=MODEL_HELP["zmq"] + f"; port {DEFAULT_PORTS['zmq']}.",
    )
    zmq.add_argument(
        "--listen",
        action="append",
        metavar="URL",
        help="a ZeroMQ endpoint to bind instead of tcp://HOST:PORT (tcp://, ipc://; repeatable)",
    )

    beats = Parser(add_help=False)
    beats.add_argument(
        "--heartbeat",
        type=option_type("heartbeat"),
        metavar="SECONDS",
        help="broker-worker heartbeat interval (default: 1)",
    )
    beats.add_argument(
        "--liveness",
        type=option_type("liveness"),
        metavar="N",
        help="heartbeats missed before a peer counts as dead (default: 3)",
    )
    beats.add_argument(
        "--max-message",
        type=int,
        metavar="BYTES",
        help="the largest message, all its frames together (default: 67108864, 64 MiB); the broker answers "
        "a larger one with an error reply; a single larger frame closes its connection",
    )
    broker = models.add_parser(
        "broker",
        parents=[tcp, beats, common],
        help=MODEL_HELP["broker"],
        description=MODEL_HELP["broker"] + f"; ports {DEFAULT_PORTS['broker']} and {BROKER_BACKEND_PORT}. "
        "Least-recently-used routing; a worker that dies or hangs leaves the pool and the request it held "
        "goes to another worker, answered once.",
    )
    broker.add_argument(
        "--frontend",
        dest="broker_frontend",
        action="append",
        metavar="URL",
        help=f"where clients come (default: tcp://HOST:PORT); {ENDPOINT_RULE}",
    )
    broker.add_argument(
        "--backend",
        dest="broker_backend",
        action="append",
        metavar="URL",
        help=f"where workers come (default: tcp://HOST:{BROKER_BACKEND_PORT}); {ENDPOINT_RULE}",
    )
    broker.add_argument(
        "--curve-secret",
        type=_path,
        metavar="FILE",
        help="the broker's secret certificate (NAME.key_secret, see keygen): the backend becomes a CURVE server; "
        "needs --curve-allow",
    )
    broker.add_argument(
        "--curve-allow",
        type=_path,
        metavar="DIR",
        help="folder of the public certificates (*.key) of the workers allowed to join; any other peer gets nothing",
    )
    broker.add_argument(
        "--insecure",
        action="store_const",
        const=1,
        help="allow a backend reachable from other hosts without CURVE (MYECHO_INSECURE=1): any peer is a worker",
    )
    broker.add_argument(
        "--request-timeout",
        type=float,
        metavar="SECONDS",
        help="a request not answered this long after the broker read it gets the error reply (default: 15)",
    )
    broker.add_argument(
        "--hold-timeout",
        type=float,
        metavar="SECONDS",
        help="a worker that holds a request longer loses it to another worker and leaves the pool (default: 5)",
    )
    broker.add_argument(
        "--client-bytes",
        type=int,
        metavar="BYTES",
        help="what the broker holds for one client, requests and replies, before it refuses the client's "
        "next requests with an error reply (default: 268435456, 256 MiB)",
    )
    broker.add_argument(
        "--broker-bytes",
        type=int,
        metavar="BYTES",
        help="what the broker holds in all before it refuses requests with an error reply (default: 1073741824, 1 GiB)",
    )
    worker = models.add_parser(
        "worker",
        parents=[beats, common],
        help=MODEL_HELP["worker"],
        description=MODEL_HELP["worker"] + ". It reconnects by itself when the broker falls silent.",
    )
    worker.add_argument(
        "--connect",
        dest="worker_connect",
        metavar="URL",
        help=f"the broker's backend (default: MYECHO_WORKER_CONNECT, else tcp://127.0.0.1:{BROKER_BACKEND_PORT}); "
        "@URL binds instead and lets the broker connect",
    )
    worker.add_argument(
        "--window",
        type=int,
        metavar="N",
        help="requests the broker may send this worker before it answers the first (default: 32)",
    )
    worker.add_argument(
        "--curve-secret",
        type=_path,
        metavar="FILE",
        help="the worker's secret certificate (NAME.key_secret, see keygen); needs --curve-server",
    )
    worker.add_argument(
        "--curve-server",
        type=_path,
        metavar="FILE",
        help="the broker's public certificate (NAME.key): talk CURVE to a broker with that key only",
    )

    check = commands.add_parser(
        "check-config",
        help="check a settings file as every model would read it; exit 0 only when clean",
        description="Check a settings file (MYECHO_NAME=value lines) as every model would read it: "
        "bytes that are not UTF-8, lines that are not NAME=value, bad or out-of-range values, "
        "MYECHO_ names that no model knows (typos). One line per problem, FILE:LINE: what; "
        f"exit 0 when clean, {EXIT_BAD_CONFIG} when not. The units run it before they start or reload.",
    )
    check.add_argument(
        "file", nargs="?", type=_path, default=DEFAULT_CONFIG, metavar="FILE", help=f"default: {DEFAULT_CONFIG}"
    )
    check.add_argument(
        "--save",
        type=_path,
        metavar="COPY",
        help="when FILE is clean, copy it to COPY (atomically): the settings a unit starts and reloads with",
    )
    check.add_argument(
        "--or-last",
        action="store_true",
        help="with --save: when FILE is bad but COPY holds an earlier clean copy, say so and exit 0 "
        "(a restart keeps the last good settings instead of taking the service down)",
    )

    from myecho.patterns.cli import add_pattern_commands

    add_pattern_commands(commands, Parser, ENDPOINT_RULE)

    keygen = commands.add_parser(
        "keygen",
        help="write a CURVE key pair for a broker or a worker",
        description="Write DIR/NAME.key (the public certificate, to copy to the other side) and "
        "DIR/NAME.key_secret (mode 0600, stays here), in pyzmq's zmq.auth format. "
        "Never overwrites a file, never writes through a symlink.",
    )
    keygen.add_argument("directory", type=_path, metavar="DIR", help="an existing folder, e.g. /etc/myecho/curve")
    keygen.add_argument("name", metavar="NAME", help="the files' name, e.g. broker or the host's name")

    client = commands.add_parser(
        "client",
        help="a telnet-like client: stdin lines out, echoes to stdout",
        description="Send stdin to an echo server and print what comes back.",
    )
    client.add_argument("--zmq", action="store_true", help="talk ZeroMQ REQ (one request per line)")
    client.add_argument(
        "address", metavar="ADDRESS", help="HOST:PORT for TCP; a ZeroMQ URL (tcp://HOST:PORT, ipc://PATH) with --zmq"
    )
    client.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up when the server says nothing for this long (default: 10)",
    )
    return parser


def _path(value: str) -> object:
    from pathlib import Path

    return Path(value).absolute()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["serve", "inetd"]:
        from myecho.models.inetd import main as inetd_main

        return inetd_main()
    options = build_parser().parse_args(args)
    if options.command == "check-config":
        from myecho.checkconfig import run_check

        return run_check(options.file, options.save, options.or_last)
    if options.command == "client":
        from myecho.client import run_client

        return run_client(options.address, zmq=options.zmq, timeout=options.timeout)
    if options.command == "keygen":
        from myecho.core.curve import keygen_main

        return keygen_main(options.directory, options.name)
    if options.command != "serve":
        from myecho.patterns.cli import run_pattern

        return run_pattern(vars(options))
    if options.model == "inetd":
        from myecho.models.inetd import main as inetd_main

        return inetd_main()
    from myecho.service import run_service

    return run_service(vars(options))


if __name__ == "__main__":
    sys.exit(main())
