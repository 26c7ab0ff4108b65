"""The shared layer every model stands on, so that a model only serves.

    sockets     listening sockets: systemd's, or bound here; ``Listeners``,
                what a model declares it needs; the fd-limit raise
    settings    defaults, the admin's file, the command line: one table
    systemd     sd_notify and journald, no-ops without systemd
    signals     signals noted by a handler that does nothing, acted on by
                the loop (a wakeup fd)
    runtime     what a model is handed: its sockets, the notifier, the
                signal fd, figures, graceful stop and reload
    accepting   accepting the same way everywhere: batches, limits, a
                pause at the fd limit, idle connections shed
    endpoints   how every ZeroMQ socket is attached (@bind, >connect)
    curve       CURVE between the broker and its workers
    echo        the blocking echo loop of the process-per-connection models
    daemon      the classic daemonize, for life without systemd
    prefork     ``--workers N``: N event loops on one listening socket
    processes   children that die with their parent, reaped without blocking
    zmqfront    the ROUTER clients connect to (zmq model, broker): options,
                endpoints, connection count, the pause at the fd limit

Each model's loop calls ``runtime.on_signals()`` when the signal fd is
readable and ``runtime.tick()`` at least every ``runtime.timeout()``
seconds; everything systemd and the admin see follows from those two
calls, the same for every model.
"""
