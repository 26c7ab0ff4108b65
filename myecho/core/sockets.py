"""One way to get listening sockets: from systemd, or bound here.

Under socket activation systemd already holds the sockets and passes them
as fds 3, 4, ... (sd_listen_fds(3)); a restart then loses no connection
attempt, since they wait in the kernel's backlog, and the service needs no
network privileges at all. Started by hand, the daemon binds them itself,
with a backlog large enough for the talk's 1,000 simultaneous connections
(PHP's default of 32 and libzmq's 100 are what made the talk's figures
climb to a minute: SYN retransmissions, not code).

Each model declares what it needs (``Listeners``: systemd's sockets, one
bound on HOST:PORT, sockets by role, or none when libzmq binds its own
endpoints), and start-up gets them the same way for every model.
"""

from __future__ import annotations

import os
import resource
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from myecho.core.settings import Settings


class ListenError(OSError):
    """A listening socket could not be had; the message is for the admin."""


def from_systemd() -> list[socket.socket]:
    """The sockets systemd passed us ($LISTEN_FDS), or [] when started by hand."""
    if "LISTEN_FDS" not in os.environ:
        return []
    try:
        from systemd import daemon
    except ImportError:
        fds = _listen_fds()
    else:
        fds = daemon.listen_fds(unset_environment=True)
    os.environ.pop("LISTEN_FDNAMES", None)
    sockets = []
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        sockets.append(sock)
    return sockets


def _listen_fds() -> list[int]:
    """sd_listen_fds(3) with the standard library: fds 3, 4, ... when
    $LISTEN_PID is this process (else they were meant for another); the
    variables are unset either way, so that no child takes them for its own."""
    try:
        pid, count = int(os.environ.get("LISTEN_PID", "")), int(os.environ["LISTEN_FDS"])
    except ValueError:
        return []
    finally:
        os.environ.pop("LISTEN_PID", None)
        os.environ.pop("LISTEN_FDS", None)
    return list(range(3, 3 + count)) if pid == os.getpid() and count > 0 else []


def from_systemd_named() -> list[tuple[str, socket.socket]]:
    """``from_systemd()`` with each socket's FileDescriptorName= (or "")."""
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    sockets = from_systemd()
    return [(names[n] if n < len(names) else "", sock) for n, sock in enumerate(sockets)]


def match_roles(names: list[str], roles: tuple[str, ...]) -> list[str]:
    """What each of systemd's sockets is for, given the roles a model declares.

    By FileDescriptorName= when every socket has its own name among the
    roles, else by position (a socket unit names all its sockets alike):
    the first ListenStream= takes the first role, the second the second;
    any further ones the first.
    """
    if len(set(names)) == len(names) and set(names) <= set(roles):
        return list(names)
    return list(roles[: len(names)]) + [roles[0]] * (len(names) - len(roles))


@dataclass(frozen=True)
class Listeners:
    """The listening sockets a model needs, declared by the model (``LISTENERS``).

    The model says what it needs; ``acquire`` gets it the same way for every
    model, so starting a model never asks which model it is.
    """

    #: Take the sockets systemd passed (socket activation).
    systemd: bool = True
    #: When systemd passed none, bind ``settings.host:settings.port`` here.
    bind: bool = True
    #: What each of systemd's sockets is for, when there are several kinds
    #: (matched by FileDescriptorName= or by position); () when all alike.
    roles: tuple[str, ...] = ()
    #: A setting naming endpoints the model binds itself (libzmq): when it
    #: lists any, nothing is bound here.
    endpoints: str = ""

    def acquire(self, settings: Settings) -> tuple[list[socket.socket], list[str]]:
        """The sockets, and their roles (``[]`` when the model declares none)."""
        if not self.systemd:
            return [], []
        named = from_systemd_named()
        sockets = [sock for _, sock in named]
        if self.roles:
            return sockets, match_roles([name for name, _ in named], self.roles)
        own_endpoints = bool(self.endpoints and getattr(settings, self.endpoints))
        if sockets or not self.bind or own_endpoints:
            return sockets, []
        return [bind_tcp(settings.host, settings.port, settings.backlog)], []


def bind_tcp(host: str, port: int, backlog: int) -> socket.socket:
    """A TCP listening socket on host:port (IPv4 or IPv6)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ListenError(f"cannot resolve {host!r}: {error.strerror}") from error
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        raise ListenError(f"cannot listen on {format_address(host, port)}: {error.strerror}") from error
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (someone may take it before it is bound)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(sock: socket.socket) -> str:
    """Where a listening socket listens, for logs and status lines."""
    try:
        address = sock.getsockname()
    except OSError:
        return f"fd {sock.fileno()}"
    if isinstance(address, tuple):
        return format_address(address[0], address[1])
    return str(address)


def zmq_endpoint(sock: socket.socket) -> str:
    """The tcp:// URL libzmq must be given along with ZMQ_USE_FD for ``sock``."""
    return "tcp://" + describe(sock)


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one: each connection is an fd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft
