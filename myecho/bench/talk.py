"""The talk's own figures (Atom N270 1.6 GHz, 1 GB, 2012), for ``--talk``.

They are quoted as printed on the slides, as text: "5 μs", "-", "< 120".
The talk's rows map onto our models: C is the C reference (fork per
connection), xinetd the inetd model under xinetd, "multi" the fork model,
"mono" the select model, zmq the ZeroMQ model.
"""

from __future__ import annotations

#: model name -> the talk's row label
TALK_ROW = {
    "c": "C",
    "inetd-xinetd": "xinetd",
    "fork": "multi",
    "fork-classic": "multi",
    "select": "mono",
    "zmq": "zmq",
}

#: the talk's row -> (connect, exchange 1, exchange 2)
SINGLE = {
    "C": ("5 μs", "3 μs", "2 μs"),
    "xinetd": ("5 μs", "31 ms", "2 μs"),
    "multi": ("5 μs", "8 μs", "2 μs"),
    "mono": ("5 μs", "3 μs", "3 μs"),
    "zmq": ("2 ms", "2 ms", "4 μs"),
}

#: the talk's row -> (100 connections, 100 messages, 1000 connections, 1000 messages, maximum)
MULTI = {
    "C": ("0.04 s", "0.05 s", "6.5 s", "0.2 s", "> 1000"),
    "xinetd": ("0.4 s", "1.8 s", "-", "-", "< 120"),
    "multi": ("3 s", "0.05 s", "60.5 s", "0.2 s", "> 1000"),
    "mono": ("0.04 s", "0.05 s", "57.5 s", "3.6 s", "> 1000"),
    "zmq": ("0.05 s", "0.12 s", "0.6 s", "0.8 s", "> 1000"),
}


def single_row(model: str) -> tuple[str, str, str] | None:
    """The talk's single-connection figures for one of our models, if it had them."""
    row = TALK_ROW.get(model)
    return SINGLE[row] if row else None


def multi_row(model: str) -> tuple[str, str, str, str, str] | None:
    """The talk's multiple-connection figures for one of our models, if it had them."""
    row = TALK_ROW.get(model)
    return MULTI[row] if row else None
