"""ZeroMQ beyond REQ/REP: the talk's last slides, as working pieces.

``endpoints`` (how every socket here is attached: bind or connect, any
transport), ``heartbeat`` (the broker-worker protocol), ``pipeline``
(ventilator, workers, sink), ``pubsub`` (publisher, subscribers) and
``measure`` (throughput figures for myecho-bench). The broker and its
worker are daemon models: ``myecho.models.broker``, ``myecho.models.worker``.
"""
