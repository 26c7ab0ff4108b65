"""How every ZeroMQ socket of myecho is attached: one rule, any transport.

ZeroMQ decouples who binds from who sends: a worker may connect to the
broker or the broker to the worker, over ``tcp://``, ``ipc://`` or
``inproc://`` alike. Each option that takes an endpoint therefore takes a
URL with CZMQ's prefixes: ``@URL`` binds, ``>URL`` connects, and a bare URL
does what the socket's role usually does (a broker binds, a worker
connects). The same option may be given several times.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # myecho.service imports this module: no pyzmq for the other models
    import zmq

BIND, CONNECT = "@", ">"


class EndpointError(ValueError):
    """An endpoint that cannot be used; the message names it."""


def split(spec: str, default: str) -> tuple[str, str]:
    """``(action, url)`` for ``@url``, ``>url`` or a bare url (``default``)."""
    action = default
    if spec[:1] in (BIND, CONNECT):
        action, spec = spec[0], spec[1:]
    if "://" not in spec:
        raise EndpointError(f"endpoint {spec!r} is not a ZeroMQ URL (tcp://HOST:PORT, ipc://PATH, inproc://NAME)")
    return action, spec


def attach(sock: zmq.Socket[bytes], specs: list[str], default: str) -> list[str]:
    """Bind or connect ``sock`` to every spec; return what it is attached to.

    Bound endpoints are returned as libzmq resolved them (a port 0 becomes
    the port chosen), connected ones with a leading ``>``.
    """
    import zmq

    where = []
    for spec in specs:
        action, url = split(spec, default)
        if "://[" in url:  # an IPv6 address: libzmq wants to be told
            sock.setsockopt(zmq.IPV6, 1)
        try:
            if action == BIND:
                sock.bind(url)
                where.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
            else:
                sock.connect(url)
                where.append(CONNECT + url)
        except zmq.ZMQError as error:
            verb = "bind" if action == BIND else "connect"
            raise EndpointError(f"cannot {verb} {url}: {zmq.strerror(error.errno or 0)}") from error
    return where


def detach(sock: zmq.Socket[bytes], where: list[str]) -> None:
    """Undo ``attach`` (unbind what was bound), ignoring what is already gone."""
    import zmq

    for endpoint in where:
        try:
            if endpoint.startswith(CONNECT):
                sock.disconnect(endpoint[1:])
            else:
                sock.unbind(endpoint)
        except zmq.ZMQError:
            pass
