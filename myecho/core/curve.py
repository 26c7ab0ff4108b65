"""CURVE security between the broker and its workers: keys, certificates, ZAP.

The broker's backend is where workers come, possibly from other hosts.
Without security anyone who reaches that port is a worker: it gets client
requests and answers them. With ``--curve-secret`` and ``--curve-allow``
the backend becomes a CURVE server (ZeroMQ's own authenticated encryption,
RFC 26 of zeromq.org) and libzmq asks a ZAP handler (RFC 27) about every
connecting peer during the handshake: only the public keys found in the
allow folder get in. A plain peer (NULL mechanism) fails the handshake
before ZAP is even asked, an unknown key is denied by ZAP; neither ever
appears on the ROUTER socket, so the broker sends it nothing, not even a
heartbeat.

The ZAP handler is a thread of its own with its own ZAP socket on the
broker's context, as pyzmq's ``zmq.auth.ThreadAuthenticator``: the broker's
loop never waits for it (libzmq's I/O thread does), and a broker busy with
a burst of requests does not starve it, because libzmq delivers ZAP
requests to that thread's socket, not to the broker's poll set. Polling the
ZAP socket in the broker's loop would put every handshake behind a batch
of requests, and the loop belongs to the broker's protocol, which must not
know about security. It is not pyzmq's class itself: in the pyzmq of
Debian 12 (24.0) that thread is not a daemon, so the broker's process would
wait for it for ever after its last line, until systemd's SIGKILL; and the
class's API differs between pyzmq releases. A ZAP reply is six frames (RFC
27): a small loop does it. The backend also sets ZAP_ENFORCE_DOMAIN, so a
missing handler fails closed (libzmq would otherwise admit every key).

Certificates are in pyzmq's ``zmq.auth`` format (ZPL, as CZMQ's zcert):
``NAME.key`` holds the public key, ``NAME.key_secret`` both keys.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from myecho.core.endpoints import BIND, EndpointError, split
from myecho.core.settings import BROKER_BACKEND_PORT, Settings

if TYPE_CHECKING:
    import zmq

    from myecho.core.runtime import Runtime

ZAP_DOMAIN = "myecho-backend"
PUBLIC_SUFFIX, SECRET_SUFFIX = ".key", ".key_secret"
DENIED_LOG_INTERVAL = 60.0  # seconds between two log lines about one denied key
_HEADER = "#   ****  Generated on {now} by myecho keygen  ****\n#   ZeroMQ CURVE {kind} Certificate\n#   {advice}\n\n"
_SECRET_ADVICE = "DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions."
_PUBLIC_ADVICE = "Copy this file to the peer that must recognise this key (see myecho(1), keygen)."


class CurveError(EndpointError):
    """CURVE cannot be set up as asked; the message says why, in one line.

    An ``EndpointError``: like an endpoint that cannot be bound, nothing is
    served and the service exits with that one line."""


# -- keys on disk --------------------------------------------------------------
def keygen(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (mode 0600).

    Each file is created with O_CREAT|O_EXCL|O_NOFOLLOW and its final mode,
    so it is never readable by others, not even for a moment, whatever the
    umask; an existing file or symlink is never overwritten or followed.
    """
    import zmq

    if not name or "/" in name or name.startswith(".") or not name.isprintable():
        raise CurveError(f"keygen: {name!r} is not a usable name (no '/', no leading '.')")
    if not directory.is_dir():
        what = "is not a folder" if directory.exists() else "does not exist"
        raise CurveError(f"keygen: {directory} {what}")
    public_path, secret_path = directory / (name + PUBLIC_SUFFIX), directory / (name + SECRET_SUFFIX)
    for path in (public_path, secret_path):
        if os.path.lexists(path):
            kind = "a symlink" if path.is_symlink() else "already there"
            raise CurveError(f"keygen: {path} is {kind}: not overwritten")
    public, secret = zmq.curve_keypair()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    secret_text = _HEADER.format(now=now, kind="**Secret**", advice=_SECRET_ADVICE) + _zpl(public, secret)
    public_text = _HEADER.format(now=now, kind="Public", advice=_PUBLIC_ADVICE) + _zpl(public, None)
    _create(secret_path, secret_text, 0o600)
    try:
        _create(public_path, public_text, 0o644)
    except CurveError:
        secret_path.unlink()
        raise
    return public_path, secret_path


def _zpl(public: bytes, secret: bytes | None) -> str:
    """The ``metadata``/``curve`` sections that ``zmq.auth.load_certificate`` reads."""
    text = f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    return text + (f'    secret-key = "{secret.decode()}"\n' if secret is not None else "")


def _create(path: Path, text: str, mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except OSError as error:
        raise CurveError(f"keygen: cannot create {path}: {error.strerror}") from None
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away from the public one
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Certificate:
    """Keys read from one certificate file (z85 text, as libzmq takes them)."""

    path: Path
    public: bytes
    secret: bytes | None

    def describe(self) -> str:
        return describe(self.path)


def describe(path: Path) -> str:
    """The file as given, and what it really is when that is a symlink."""
    real = path.resolve()
    return str(path) if real == path.absolute() else f"{path} (-> {real})"


def load(path: Path, secret: bool) -> Certificate:
    """Read a certificate; refuse what is not a valid one of the kind asked."""
    import zmq
    import zmq.auth

    kind = "secret" if secret else "public"
    path = Path(path)
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except OSError as error:
        why = error.strerror or ("no such file" if not os.path.lexists(path) else "unreadable")
        raise CurveError(f"cannot read CURVE {kind} certificate {path}: {why}") from None
    except (ValueError, IndexError):
        raise CurveError(f"{describe(path)} is not a CURVE certificate (no public-key line)") from None
    if not _z85_key(public) or (secret_key is not None and not _z85_key(secret_key)):
        raise CurveError(f"{describe(path)} is not a CURVE certificate (a key is not 40 characters of Z85)")
    if secret and secret_key is None:
        raise CurveError(f"{describe(path)} is a public certificate: a secret one ({SECRET_SUFFIX}) is needed here")
    if not secret and secret_key is not None:
        raise CurveError(f"{describe(path)} holds a secret key: give the public certificate ({PUBLIC_SUFFIX}) instead")
    if secret_key is not None and zmq.curve_public(secret_key) != public:
        raise CurveError(f"{describe(path)}: its public key does not belong to its secret key")
    return Certificate(path, public, secret_key)


def _z85_key(key: bytes) -> bool:
    from zmq.utils import z85

    if len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        return False


def load_allowed(directory: Path) -> dict[bytes, str]:
    """Public keys of ``DIR/*.key``, each with its file's name."""
    if not directory.is_dir():
        what = "is not a folder" if directory.exists() else "does not exist"
        raise CurveError(f"CURVE allow folder {directory} {what}")
    allowed: dict[bytes, str] = {}
    try:
        paths = sorted(directory.glob("*" + PUBLIC_SUFFIX))
    except OSError as error:
        raise CurveError(f"cannot list CURVE allow folder {directory}: {error.strerror}") from None
    for path in paths:
        allowed[load(path, secret=False).public] = path.name
    return allowed


def folder_state(directory: Path) -> tuple[tuple[str, int, int, int], ...] | None:
    """What changes when a key file is added, removed or rewritten (None: unreadable)."""
    try:
        found = [(path.name, path.stat()) for path in directory.glob("*" + PUBLIC_SUFFIX)]
    except OSError:
        return None
    return tuple(sorted((name, st.st_ino, st.st_size, st.st_mtime_ns) for name, st in found))


# -- the broker: a CURVE server and its ZAP handler ----------------------------
class Allowed:
    """The ZAP decision: is this client key in the allow folder?

    Called in the ZAP thread for every CURVE handshake. The folder is
    looked at (a few stat calls) before each decision and read again when
    a key file was added, removed or rewritten, so an admin's change counts
    from the next handshake, without a signal; a folder that no longer
    loads keeps the keys it had, and says so once."""

    def __init__(self, directory: Path, log: logging.Logger) -> None:
        self.directory = directory
        self.log = log
        self.state = folder_state(directory)
        self.keys = load_allowed(directory)
        self.denied_at: dict[bytes, float] = {}
        self.denied = 0

    def refresh(self) -> None:
        state = folder_state(self.directory)
        if state != self.state:
            self.state = state
            self.reload()

    def admits(self, key: bytes, address: str) -> bool:
        """``key`` in Z85, as the certificates hold it."""
        self.refresh()
        name = self.keys.get(key)
        if name is not None:
            self.log.debug("CURVE key %s (%s) from %s admitted", key.decode(), name, address)
            return True
        self.denied += 1
        now = time.monotonic()
        if now - self.denied_at.get(key, -DENIED_LOG_INTERVAL) >= DENIED_LOG_INTERVAL:
            if len(self.denied_at) > 1000:
                self.denied_at.clear()
            self.denied_at[key] = now
            self.log.warning(
                "a worker with an unknown CURVE key %s was refused, from %s (%d refusals so far)",
                key.decode(),
                address,
                self.denied,
            )
        return False

    def reload(self) -> None:
        """Read the folder again; on any error keep the current keys."""
        try:
            keys = load_allowed(self.directory)
        except CurveError as error:
            self.log.error("CURVE allow folder changed but not reloaded: %s; keeping %s", error, _names(self.keys))
            return
        self.keys = keys
        self.log.info("CURVE allow folder changed: now %s", _names(keys))


def _names(keys: dict[bytes, str]) -> str:
    if not keys:
        return "no worker key: no worker can join"
    return f"{len(keys)} worker key{'' if len(keys) == 1 else 's'} ({', '.join(sorted(keys.values()))})"


class ZapHandler(threading.Thread):
    """Answers libzmq's ZAP requests for one context, in a daemon thread.

    ZAP (RFC 27): libzmq sends [version, request id, domain, address,
    routing id, mechanism, credentials...] to ``inproc://zeromq.zap.01``
    and waits for [version, request id, status, text, user id, metadata]."""

    ENDPOINT = "inproc://zeromq.zap.01"

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], allowed: Allowed) -> None:
        import zmq

        super().__init__(name="myecho-zap", daemon=True)
        self.allowed = allowed
        self.sock = context.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        try:
            self.sock.bind(self.ENDPOINT)
        except zmq.ZMQError as error:
            self.sock.close()
            raise CurveError(f"cannot start the ZAP handler: {error.strerror}") from None

    def run(self) -> None:
        import zmq

        while True:
            try:
                request = self.sock.recv_multipart()
            except zmq.ContextTerminated:
                self.sock.close()
                return
            try:
                reply = self.answer(request)
            except Exception:  # a handler that dies would leave every handshake waiting
                self.allowed.log.exception("ZAP request not understood: refused")
                reply = [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"Internal error", b"", b""]
            self.sock.send_multipart(reply)

    def answer(self, request: list[bytes]) -> list[bytes]:
        from zmq.utils import z85

        version, request_id, domain, address, _routing_id, mechanism, *credentials = request
        ok = (
            version == b"1.0"
            and domain == ZAP_DOMAIN.encode()
            and mechanism == b"CURVE"
            and len(credentials) == 1
            and len(credentials[0]) == 32
            and self.allowed.admits(z85.encode(credentials[0]), address.decode(errors="replace"))
        )
        if ok:
            return [b"1.0", request_id, b"200", b"OK", z85.encode(credentials[0]), b""]
        return [b"1.0", request_id, b"400", b"Not allowed", b"", b""]


#: ZAP handlers started, one per context, for the life of the process.
_zap_handlers: dict[int, ZapHandler] = {}


def secure_backend(sock: zmq.Socket[bytes], runtime: Runtime) -> None:
    """Make the broker's backend a CURVE server, or check that it may stay plain.

    Called once, after the socket is created and before it is bound. With
    neither ``curve_secret`` nor ``curve_allow`` the backend stays plain,
    which is refused for an address beyond this host unless ``insecure``.
    On a refusal the socket is closed and ``CurveError`` says why."""
    try:
        _secure_backend(sock, runtime)
    except CurveError:
        sock.close(linger=0)
        raise


def _secure_backend(sock: zmq.Socket[bytes], runtime: Runtime) -> None:
    settings = runtime.settings
    secret_path, allow = settings.curve_secret, settings.curve_allow
    if secret_path is None and allow is None:
        exposed = [where for where in backend_endpoints(runtime) if not _local(where)]
        if exposed and not settings.insecure:
            raise CurveError(
                f"the backend {exposed[0]} is reachable from other hosts and has no CURVE: give --curve-secret "
                "and --curve-allow, or --insecure to serve any worker that connects"
            )
        if exposed:
            runtime.log.warning("backend %s without CURVE (--insecure): anyone who reaches it is a worker", exposed[0])
        return
    if secret_path is None or allow is None:
        given, missing = ("curve-secret", "curve-allow") if allow is None else ("curve-allow", "curve-secret")
        raise CurveError(f"{_option(given)} without {_option(missing)}: the broker needs both for CURVE")
    _need_curve()
    import zmq

    certificate = load(secret_path, secret=True)
    allowed = Allowed(allow, runtime.log)
    handler = _zap_handlers.get(id(sock.context))
    if handler is None:
        handler = _zap_handlers[id(sock.context)] = ZapHandler(sock.context, allowed)
        handler.start()
    handler.allowed = allowed
    sock.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    assert certificate.secret is not None
    sock.setsockopt(zmq.CURVE_SECRETKEY, certificate.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, certificate.public)
    runtime.log.info(
        "backend: CURVE server with %s (public key %s); allowed from %s: %s",
        certificate.describe(),
        certificate.public.decode(),
        allow,
        _names(allowed.keys),
    )


def backend_endpoints(runtime: Runtime) -> list[str]:
    """What the broker will attach its backend to, as URLs (for the loopback rule)."""
    settings: Settings = runtime.settings
    if settings.broker_backend:
        return list(settings.broker_backend)
    held = [sock for sock, role in zip(runtime.listeners, runtime.listener_roles, strict=False) if role == "backend"]
    if held:
        return [_url_of(sock) for sock in held]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return [f"tcp://{host}:{BROKER_BACKEND_PORT}"]


def _url_of(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return "ipc://" + str(sock.getsockname())
    host, port = sock.getsockname()[:2]
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _local(spec: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address only."""
    _, url = split(spec, BIND)
    transport, _, rest = url.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rsplit(";", 1)[-1].rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        pass
    if host in ("", "*"):
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False  # an interface name, or a name that does not resolve: assume the worst
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def _option(name: str) -> str:
    """An option as the command line and the settings file spell it."""
    return f"--{name} ({'MYECHO_' + name.replace('-', '_').upper()})"


def _need_curve() -> None:
    import zmq

    if not zmq.has("curve"):
        raise CurveError(f"this libzmq ({zmq.zmq_version()}) was built without CURVE")


# -- the worker: a CURVE client ------------------------------------------------
_client_keys: dict[tuple[Path, Path], tuple[Certificate, Certificate]] = {}
_client_lock = threading.Lock()


def secure_worker(sock: zmq.Socket[bytes], runtime: Runtime | None) -> None:
    """Make a worker's fresh DEALER a CURVE client of the broker, if configured.

    Called for every socket the worker opens (it opens a new one after
    each silence); the certificates are read the first time only, and a
    problem with them then stops the worker with one line."""
    if runtime is None:
        return
    try:
        _secure_worker(sock, runtime)
    except CurveError:
        sock.close(linger=0)
        raise


def _secure_worker(sock: zmq.Socket[bytes], runtime: Runtime) -> None:
    settings = runtime.settings
    secret_path, server_path = settings.curve_secret, settings.curve_server
    if secret_path is None and server_path is None:
        return
    if secret_path is None or server_path is None:
        given, missing = ("curve-secret", "curve-server") if server_path is None else ("curve-server", "curve-secret")
        raise CurveError(f"{_option(given)} without {_option(missing)}: the worker needs both for CURVE")
    import zmq

    with _client_lock:
        keys = _client_keys.get((secret_path, server_path))
        if keys is None:
            _need_curve()
            keys = load(secret_path, secret=True), load(server_path, secret=False)
            _client_keys[(secret_path, server_path)] = keys
            runtime.log.info(
                "CURVE client with %s (public key %s), broker's key from %s (%s)",
                keys[0].describe(),
                keys[0].public.decode(),
                keys[1].describe(),
                keys[1].public.decode(),
            )
    mine, server = keys
    assert mine.secret is not None
    sock.setsockopt(zmq.CURVE_SECRETKEY, mine.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, mine.public)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server.public)


# -- myecho keygen -------------------------------------------------------------
def keygen_main(directory: Path, name: str) -> int:
    """``myecho keygen DIR NAME``: one line on success or failure."""
    try:
        public, secret = keygen(directory, name)
    except CurveError as error:
        print(f"myecho: {error}", file=sys.stderr)
        return 1
    print(f"{public} (public: copy it to the other side) and {secret} (secret, mode 0600) written")
    return 0
