"""myecho-bench: the talk's two benchmark tables, regenerated on this machine.

The package is split by job: ``servers`` starts and watches the models,
``procs`` reads their CPU and memory from /proc, ``loadgen`` drives the
load generators (a C epoll client for TCP, pyzmq for ZeroMQ), ``scenarios``
holds the measurements and the ramp's stopping rules, ``stats`` the
arithmetic, ``report`` the tables, JSON and charts, ``cli`` the command.
"""
