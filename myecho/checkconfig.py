"""``myecho check-config [FILE]``: a settings file checked before it is used.

Like ``nginx -t`` or ``sshd -t``: one line per problem (``FILE:LINE: what``)
and exit 0 only when the file is clean, so the units run it before they
start or reload a model and a typo is refused before it can reach a
running daemon.

``--save COPY`` copies a clean file to COPY, the file the unit's daemon
actually reads; ``--or-last`` lets a start go on with that last clean copy
when the file has gone bad since. So ``systemctl restart`` after a typo
keeps the service up on the settings it already ran with, and says why.
"""

import os
import sys
import tempfile
from pathlib import Path

from myecho.core.settings import EXIT_BAD_CONFIG, check_file


def save_copy(source: Path, copy: Path) -> None:
    """Replace ``copy`` by the bytes of ``source`` in one rename (readers never see half a file)."""
    data = source.read_bytes()
    if not copy.parent.is_dir():
        copy.parent.mkdir(parents=True)
        os.chmod(copy.parent, 0o755)  # whatever the umask (the units' is 0077): the models read it
    fd, temporary = tempfile.mkstemp(dir=copy.parent, prefix=f".{copy.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, copy)
    except BaseException:
        os.unlink(temporary)
        raise


def run_check(path: Path, save: Path | None = None, or_last: bool = False) -> int:
    """Print the problems of ``path``; 0 when clean, ``EXIT_BAD_CONFIG`` when not."""
    problems = check_file(path)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        if save is not None:
            try:
                save_copy(path, save)
            except OSError as error:
                print(f"myecho: cannot save {path} as {save}: {error.strerror}", file=sys.stderr)
                return 1
        return 0
    if save is not None and or_last and save.is_file():
        print(f"myecho: {path} has {len(problems)} problem(s): starting with the last good copy, {save}")
        return 0
    return EXIT_BAD_CONFIG
