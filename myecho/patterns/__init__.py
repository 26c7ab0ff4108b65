"""ZeroMQ beyond REQ/REP: the talk's last slides, as working pieces.

    pipeline    a ventilator, N workers and a sink (PUSH/PULL), each job
                checked done exactly once
    pubsub      a publisher and subscribers with topic filters
    cli         ``myecho pipeline ...`` and ``myecho pubsub ...``

Every socket here is attached by ``core.endpoints``. The broker and its
workers serve like the other models: ``models.broker``, ``models.worker``;
their figures come from ``bench.measure``.
"""
