"""The one exception type that the CLI turns into a single clear line and a non-zero exit.

Raise :class:`SelftrainError` for anything the user can fix (a flag, a file, a config key);
the message must name the flag or file and say what to do. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class SelftrainError(ValueError):
    """A user-fixable problem: bad flag, missing file, incompatible inputs."""


def refuse_first_failed(checks: Iterable[tuple[bool, str]]) -> None:
    """Raise :class:`SelftrainError` with the message of the first check that failed.

    Every command checks its flags as a list of ``(ok, "<flag> <value>: <rule>")`` pairs
    before it reads or writes anything; this is the one loop over them.

    Args:
        checks: (passed, the one-line message if not).
    """
    for ok, message in checks:
        if not ok:
            raise SelftrainError(message)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a long command, with a message saying what was kept and how to resume.

    A long-running loop catches its ``KeyboardInterrupt`` and raises this instead, naming its
    progress (``interrupted after 3 of 8 shards; rerun the same command to resume``); the CLI
    prints the message as one line and exits with status 130.
    """
