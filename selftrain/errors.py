"""The one exception type that the CLI turns into a single clear line and a non-zero exit.

Raise :class:`SelftrainError` for anything the user can fix (a flag, a file, a config key);
the message must name the flag or file and say what to do. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class SelftrainError(ValueError):
    """A user-fixable problem: bad flag, missing file, incompatible inputs."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a long command, with a message saying what was kept and how to resume.

    A long-running loop catches its ``KeyboardInterrupt`` and raises this instead, naming its
    progress (``interrupted after 3 of 8 shards; rerun the same command to resume``); the CLI
    prints the message as one line and exits with status 130.
    """
