"""Atomic writes: a reader sees the old file (or directory) or the complete new one, never a part.

Every writer of the project goes through this module: corpus shards and manifests, the
resumable plan of ``selftrain generate``, checkpoints, HF exports, the embedded-model cache,
planted models, probe sets, evaluation results and caches. A file is written to a temp name
beside its target (``.<name>.tmp-<pid>``, which corpus readers skip as a leftover), flushed and
fsynced, renamed over the target, and the parent directory is fsynced so the rename itself
survives a power cut. A directory is filled in a hidden staging sibling, every file in it is
fsynced, and it is swapped in: an existing target is moved aside first and deleted only once the
new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp-"
"""In the name of every temp file this module writes (``.<name>.tmp-<pid>``)."""


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of this module's temp files (a leftover once a run died)."""
    return name.startswith(".") and TEMP_MARK in name


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where unsupported."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(handle)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_tree(root: Path) -> None:
    """Fsync every file and directory under ``root`` (the staging dir before its swap)."""
    for folder, _, names in os.walk(root):
        for name in names:
            _fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; once the block succeeds, move it into place.

    Write the file to the yielded path with any writer (``torch.save``, ``pq.write_table``,
    ``open``). On success it is fsynced, renamed over ``path`` and the parent dir fsynced; on an
    error the temp file is removed and ``path`` is untouched.

    Args:
        path: the final file; its parent directories are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}")
    try:
        yield staging
        _fsync_file(staging)
        os.replace(staging, target)
        fsync_dir(target.parent)
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write a text file atomically (UTF-8)."""
    with atomic_file(path) as staging:
        staging.write_text(text, encoding="utf-8")


def copy_atomic(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy a file's bytes to ``path`` atomically (its parents are created)."""
    with atomic_file(path) as staging:
        shutil.copyfile(source, staging)


def write_json_atomic(payload: Any, path: str | os.PathLike, **dump_kwargs: Any) -> None:
    """Write JSON atomically, indented, with a final newline.

    Args:
        payload: anything ``json.dumps`` takes.
        path: the final file.
        **dump_kwargs: more ``json.dumps`` arguments (``default=``, ``ensure_ascii=``).
    """
    write_text_atomic(json.dumps(payload, indent=2, **dump_kwargs) + "\n", path)


def write_parquet_atomic(table, path: str | os.PathLike) -> None:
    """Write a pyarrow table as a parquet file atomically."""
    import pyarrow.parquet as pq

    with atomic_file(path) as staging:
        pq.write_table(table, staging)


def remove(path: Path) -> None:
    """Remove a file or a directory tree, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def swap_into_place(staging: Path, target: Path, replace: bool = True,
                    previous: Path | None = None) -> bool:
    """Rename a complete staging dir (or file) to ``target``, replacing what is there last.

    An existing ``target`` is first renamed to ``previous`` (a hidden sibling by default), the
    new one renamed into place, and only then is the old one deleted: a kill at any moment
    leaves the old or the new output whole.

    Args:
        staging: the complete new output, on the same filesystem as ``target``.
        target: where it goes.
        replace: whether an existing ``target`` is replaced; if not, and one exists (another
            process finished first), ``staging`` is left for the caller to discard.
        previous: where the old output waits until the new one is in place (a name a reader
            may look for, as a sharded checkpoint's ``-previous``); None picks a hidden one.

    Returns:
        True when ``staging`` is now at ``target``, False when an existing one was kept.
    """
    if target.exists() or target.is_symlink():
        if not replace:
            return False
        previous = previous or target.with_name(f".{target.name}.previous-{os.getpid()}")
        remove(previous)
        target.rename(previous)
        staging.rename(target)
        fsync_dir(target.parent)
        remove(previous)
        return True
    try:
        staging.rename(target)
    except OSError:  # another process put a target there in the meantime
        if replace or not target.exists():
            raise
        return False
    fsync_dir(target.parent)
    return True


def missing_parents(path: str | os.PathLike) -> list[Path]:
    """The parent directories of ``path`` that do not exist yet, deepest first.

    A writer notes them before it starts and, if it gives up, hands them to
    :func:`remove_empty_dirs`: a refused or failed command leaves no empty dirs behind.
    """
    return [parent for parent in Path(path).parents if not parent.exists()]


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove each of ``dirs`` (deepest first) that exists and is empty; stop at one that is not.

    Args:
        dirs: what :func:`missing_parents` returned before the writer made them.
    """
    for folder in dirs:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # not empty (another writer's files), or not ours to remove
            return


def staging_dir(path: str | os.PathLike) -> Path:
    """A new empty hidden dir beside ``path``, to fill and then hand to :func:`publish_dir`.

    For a writer that fills its output across several calls (the corpus writer) and so cannot
    hold :func:`atomic_dir` open around the work; the caller removes the staging dir when it
    gives up.

    Args:
        path: the final directory; its parent directories are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))


def publish_dir(staging: Path, target: Path, replace: bool = True) -> bool:
    """Fsync every file of a complete staging dir, then swap it in at ``target``.

    Args:
        staging: the dir from :func:`staging_dir`, now complete.
        target: where it goes.
        replace: replace an existing ``target``; if False and one exists, ``staging`` is left
            for the caller to discard.

    Returns:
        True when ``staging`` is now at ``target``, False when an existing one was kept.
    """
    fsync_tree(staging)
    return swap_into_place(staging, target, replace=replace)


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty staging dir beside ``path``; once the block succeeds, swap it into place.

    When the block raises, the staging dir goes, and so do the parent dirs made for it.

    Args:
        path: the final directory; its parent directories are created.
        replace: replace an existing ``path`` (after the new one is complete); if False and
            one appears meanwhile, the new one is discarded and the existing one kept.
    """
    made = missing_parents(path)
    staging = staging_dir(path)
    published = False
    try:
        yield staging
        publish_dir(staging, Path(path), replace=replace)
        published = True
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if not published:
            remove_empty_dirs(made)
