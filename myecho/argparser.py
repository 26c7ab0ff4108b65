"""An argparse parser whose errors are one line on stderr, not a usage dump.

An admin reads errors in a terminal or a journal: ``PROG: what is wrong
(see --help)`` says it in one line; the usage is one ``--help`` away.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with one-line errors (exit status 2, as argparse's)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")
