"""The daemon models, side by side; each only serves.

    inetd       one connection on stdin/stdout, started per connection
    fork        a parent that accepts, a child per connection, forked ahead
                by ``spawner`` (a small process of its own); ``children``
                keeps the children and the spare pool
    select      one process, one epoll loop
    aio         the same on asyncio (uvloop when installed)
    zmq         the talk's REQ/REP echo on a ROUTER socket
    broker      REQ clients in front, ``worker`` processes behind, speaking
                ``mew`` (the broker-worker protocol, beside both)

A model module declares ``LISTENERS`` (a ``core.sockets.Listeners``: what
it is handed at start), ``PREFORK`` (whether ``--workers N`` may run it N
times on one socket) and ``serve(runtime)``; ``service`` asks nothing else
of it. inetd, handed its one connection on stdin/stdout, has ``main()``.
"""

#: model name -> module under myecho.models; imported only when chosen,
#: so ``myecho serve inetd`` never pays for pyzmq.
MODELS = {
    "inetd": "inetd",
    "fork": "fork",
    "select": "select",
    "asyncio": "aio",  # not "asyncio": the module would shadow the standard library's
    "zmq": "zmq",
    "broker": "broker",
    "worker": "worker",
}
