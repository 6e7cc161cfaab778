"""Where a command may write: never over something it did not write, never over its inputs.

An output whose directory cannot be made or written (a file in the way, no permission) is
refused before anything is read or computed, not when the first file is written.

``--overwrite`` replaces only an output this project recognisably wrote (its manifest or
in-progress marker is there) and that holds nothing else; a directory of other files, or one
that is or holds an input of the same command, is refused in one line whatever the flags. The
replacement itself is atomic (:mod:`selftrain.io`): the old output goes only once the new one is
in place.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from selftrain.errors import SelftrainError
from selftrain.io import is_temp_name


def refuse_unwritable(out: Path, flag: str = "--out", beside: bool = True) -> None:
    """Refuse an output dir that can never be made or written (a file, a link to nothing).

    A file in the way, a missing permission or a symbolic link that points nowhere is refused.

    The nearest existing one of ``out`` and its parents must be a directory this process may
    write into (a dir can never be made under a file), and so must ``out``'s parent be when the
    output is staged beside ``out`` and swapped in (:mod:`selftrain.io`).

    Args:
        out: the output directory.
        flag: the flag it came from.
        beside: the output is staged in a sibling of ``out`` (every dir output but
            ``selftrain generate``'s, which fills ``out`` itself).
    """
    for path in (out, *out.parents):
        if path.is_symlink() and not path.exists():
            raise SelftrainError(f"{flag} {out}: {'it' if path == out else path} is a symbolic "
                                 f"link to {os.readlink(path)}, which does not exist; remove "
                                 "the link or choose another path")
    existing = next(path for path in (out, *out.parents, Path(".")) if path.exists())
    if not existing.is_dir():
        where = "it" if existing == out else str(existing)
        raise SelftrainError(f"{flag} {out}: {where} is a file; choose a new directory")
    written = [existing, existing.parent] if beside and existing == out else [existing]
    for path in written:
        if not os.access(path, os.W_OK | os.X_OK):
            raise SelftrainError(f"{flag} {out}: {path} is not writable; choose a directory "
                                 "you can write to")


def refuse_beyond_disk(out: Path, needed: int, flag: str, value: object, what: str) -> None:
    """Refuse an output that cannot fit in the free space of the disk it would be written to.

    A count a user can make absurd (``--num_samples 10^15``) otherwise starts work that can
    never finish: the bound is known before anything is loaded.

    Args:
        out: the output path (it or its nearest existing parent says which disk).
        needed: bytes the output needs at the very least.
        flag: the flag that sets the count.
        value: its value, shown.
        what: the output, as the message names it.
    """
    existing = next(path for path in [out, *out.parents] if path.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise SelftrainError(f"{flag} {value}: {what} needs at least {needed / 2**30:,.1f} GiB "
                             f"on disk, more than the {free / 2**30:,.1f} GiB free under "
                             f"{existing}; ask for fewer")


def refuse_input_overlap(out: Path, inputs: Iterable[tuple[str, str | Path | None]],
                         flag: str = "--out") -> None:
    """Refuse an ``--out`` that is, holds or lies inside an input of the same command.

    Replacing such an ``--out`` would delete the input, and writing inside one would change it.

    Args:
        out: the output path.
        inputs: (flag, path) of what the command reads; None and paths that do not exist
            (hub ids, dataset names) are skipped.
        flag: the flag ``out`` came from (``--trainer.default_root_dir`` for a run dir).
    """
    target = out.resolve()
    for name, value in inputs:
        if value is None or not Path(value).exists():
            continue
        source = Path(value).resolve()
        if source == target:
            raise SelftrainError(f"{flag} {out}: is {name} itself, an input of this command; "
                                 "write to a new directory")
        if target in source.parents or source in target.parents:
            where = "holds" if target in source.parents else "lies inside"
            raise SelftrainError(f"{flag} {out}: it {where} {name} {value}, an input of this "
                                 "command; choose a directory apart from the inputs")


def check_out_dir(out: Path, overwrite: bool, markers: tuple[str, ...],
                  entries: tuple[str, ...], what: str) -> bool:
    """Refuse an ``--out`` this command may not or cannot write to; say whether it replaces one.

    A file in the way or a directory without write permission is refused
    (:func:`refuse_unwritable`). Only an output this project recognisably wrote (one of
    ``markers`` in it) is ever replaced, with ``overwrite``, and only when it holds nothing
    but such an output's ``entries`` (and hidden temp files); an empty dir is free.

    Args:
        out: the directory about to be written.
        overwrite: an existing output of this kind may be replaced.
        markers: names whose presence marks the dir as this kind of output.
        entries: every name such an output may hold.
        what: the kind of output, for messages.

    Returns:
        True when ``out`` holds an output that is to be replaced.

    Raises:
        SelftrainError: ``out`` is a file or cannot be written, holds something else, or
            holds an output of this kind and ``overwrite`` is off.
    """
    refuse_unwritable(out)
    names = refuse_foreign(out, markers, entries)
    if not names:
        return False
    if not overwrite:
        raise SelftrainError(f"--out {out}: already holds files of a selftrain {what} "
                             f"({', '.join(names)}); choose a new dir or pass --overwrite true "
                             "to replace it")
    return True


def refuse_foreign(out: Path, markers: tuple[str, ...], entries: tuple[str, ...]
                   ) -> list[str]:
    """Refuse a non-empty ``out`` that is not wholly an output of the kind ``markers`` mark.

    Whatever ``--overwrite`` says: a directory without a marker, or with anything besides
    ``entries`` (and hidden temp files), holds files this project did not write.

    Args:
        out: the output directory (nothing happens if it does not exist).
        markers: names whose presence marks the dir as this kind of output.
        entries: every name such an output may hold.

    Returns:
        The names in ``out``, temp files left out (empty when it does not exist).
    """
    names = dir_entries(out)
    foreign = [name for name in names if name not in entries]
    if names and (foreign or not set(markers) & set(names)):
        raise SelftrainError(f"--out {out}: holds files selftrain did not write there "
                             f"({listing(foreign or names)}); choose a new or empty directory")
    return names


def dir_entries(folder: Path) -> list[str]:
    """The names in ``folder``, sorted, this project's temp files left out (none: no folder)."""
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir() if not is_temp_name(entry.name))


def listing(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` names, comma-separated, with ``...`` when there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")

