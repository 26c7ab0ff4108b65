"""myecho-bench: the talk's two benchmark tables, regenerated on this machine.

The package is split by job:

    harness     servers as child processes: free ports, a fake systemd
                notify socket, start and stop (the tests use it too)
    procs       CPU and memory of a process tree, from /proc
    servers     the models under test (``Model``) and how each starts
    loadgen     drives the load generators: the C client for TCP and ZMTP,
                ``zmqload`` (pyzmq) to cross-check it
    scenarios   the measurements and the ramp's stopping rules
    stats       the arithmetic; ``report`` the tables, JSON and charts
    talk        the talk's own figures; ``startup`` the inetd rows' floor
    pyservers   bare asyncio, uvloop and pyzmq echoes, the Python references
    measure     the broker with N workers, a worker crash, the pipeline
    validate    ``--check-loadgen``: is the load generator the bottleneck?
    cli         the command

Servers are measured from outside, as processes an admin would start:
nothing here runs a model in its own process.
"""
