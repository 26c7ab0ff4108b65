"""myecho: one echo service (RFC 862) in every daemon model of the talk
"Démons en PHP, de inetd à ZeroMQ", packaged and measured.

The tree follows the layers, from the bottom up::

    core/       the shared layer: listening sockets, settings, systemd,
                signals, the Runtime a model is handed, accepting, the
                classic daemonize, --workers (prefork), CURVE
    models/     the daemon models, side by side: each only serves, and
                declares what listeners it needs
    patterns/   ZeroMQ beyond REQ/REP: the pipeline and PUB/SUB
    bench/      myecho-bench: the process harness, the load generators'
                drivers, the scenarios, the report
    cli.py      the ``myecho`` command: argument parsing only
    service.py  puts a model to work: settings, its listeners, logging, serve
    checkconfig.py, client.py, reference.py
                ``myecho check-config``, ``myecho client``, the C programs

Models take the shared layer from ``core`` (the broker and its workers
also share their protocol, ``models.mew``); ``bench`` starts models as
processes, as an admin would, and runs none in its own process.
"""

__version__ = "0.2.0"
