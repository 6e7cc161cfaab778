"""Content digests, so a checkpoint or an export that lost bits is refused before it is read.

A flipped byte in an optimizer's state or a truncated weights file can load without a word and
train on. Every checkpoint and HF export this project writes therefore carries the digest of
its bytes, written when it is saved, and every command that reads one back (``fit
--ckpt_path``, ``validate``, ``test``, and any model spec that is a local export: ``evaluate``,
``generate``) checks it first and refuses a mismatch in one line naming the file.

The digest is xxh3-128 (``xxhash``, a dependency of ``datasets``): about 9.5 GiB/s on one core
where sha256 gives about 1 GiB/s. It guards against damage, not against an attacker.

Two shapes:

- a directory (an HF export, a sharded checkpoint) holds :data:`DIGESTS_FILE`, the digest of
  every other file in it, written into its staging dir before the dir is moved into place, so
  the list appears together with the files;
- a single file (``last.ckpt``) has a sidecar ``<name>`` + :data:`SIDECAR_SUFFIX` beside it.
  A file and its sidecar cannot be renamed as one, so a save writes the sidecar twice: first
  accepting both the new and the previous digest, then, once the new file is in place, the new
  one alone. A kill at any moment leaves a file whose digest its sidecar accepts.

A checkpoint or export without digests (written by another tool, or before digests existed)
still loads; the reader says it was not verified.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

from selftrain.errors import SelftrainError
from selftrain.io import atomic_file, write_json_atomic

ALGORITHM = "xxh3_128"
DIGESTS_FILE = "digests.json"
"""A directory's digests: ``{"algorithm", "files": {relative path: {"bytes", "digest"}}}``."""
SIDECAR_SUFFIX = ".digest.json"
"""A single file's digests: ``{"algorithm", "file", "accepted": [{"bytes", "digest"}, ...]}``."""
BLOCK = 8 << 20
DAMAGED = ("it was damaged after it was saved; resume or load from another one, or write it "
           "again")


def file_digest(path: Path) -> dict[str, Any]:
    """A file's size and xxh3-128 digest, read in 8 MiB blocks.

    Args:
        path: the file.
    """
    digest = xxhash.xxh3_128()
    size = 0
    with path.open("rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "digest": digest.hexdigest()}


def digests_of(root: Path, paths: list[Path]) -> dict[str, dict[str, Any]]:
    """``{path relative to root: file_digest}`` of each path (posix separators)."""
    return {path.relative_to(root).as_posix(): file_digest(path) for path in paths}


def check_files(root: Path, files: dict[str, Any], flag: str, listed_in: str,
                damaged: str = DAMAGED) -> None:
    """Refuse the first listed file under ``root`` that is missing or differs from its digest.

    Args:
        root: the directory the names are relative to.
        files: ``{relative path: {"bytes", "digest"}}``, as :func:`digests_of` gives.
        flag: the flag ``root`` came from.
        listed_in: the file that recorded the digests, named in the refusal.
        damaged: what the refusal says to do.
    """
    for name, expected in sorted(files.items()):
        member = root / name
        if not member.is_file():
            raise SelftrainError(f"{flag} {root}: {name} is missing (listed in {listed_in}); "
                                 f"{damaged}")
        if file_digest(member) != expected:
            raise SelftrainError(f"{flag} {root}: {name} does not match its saved digest "
                                 f"({listed_in}); {damaged}")


def _listed_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*")
                  if path.is_file() and path.name != DIGESTS_FILE)


def write_dir_digests(root: Path) -> None:
    """Record the digest of every file under ``root`` in ``root/digests.json``.

    Call it on a staging dir after its last file is written, before the dir is published.

    Args:
        root: the directory.
    """
    files = digests_of(root, _listed_files(root))
    write_json_atomic({"algorithm": ALGORITHM, "files": files}, root / DIGESTS_FILE)


def sidecar(path: Path) -> Path:
    """The digest file beside a single-file checkpoint."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def digest_file(path: Path) -> Path:
    """Where a checkpoint's or export's digests are: a dir's ``digests.json``, else the sidecar."""
    return path / DIGESTS_FILE if path.is_dir() else sidecar(path)


def _write_sidecar(side: Path, name: str, accepted: list[dict[str, Any]]) -> None:
    write_json_atomic({"algorithm": ALGORITHM, "file": name, "accepted": accepted}, side)


def save_with_digest(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write a file atomically with ``write(staging_path)``, and its digest sidecar.

    Args:
        path: the final file.
        write: writes the file's bytes to the path it is given.
    """
    target = Path(path)
    side = sidecar(target)
    with atomic_file(target) as staging:
        write(staging)
        new = file_digest(staging)
        previous = _accepted(side) if target.is_file() else []
        if previous:  # until the rename, the file in place is the old one: accept both
            _write_sidecar(side, target.name, [new, *previous])
        else:  # a sidecar left without its file (or naming none) must not judge the new one
            side.unlink(missing_ok=True)
    _write_sidecar(side, target.name, [new])


def _accepted(side: Path) -> list[dict[str, Any]]:
    """The digests a sidecar accepts; none when it is missing or unreadable."""
    try:
        accepted = _read_digests(side, "").get("accepted", [])
    except SelftrainError:
        return []
    return accepted if isinstance(accepted, list) else []


def remove_with_digest(path: Path) -> None:
    """Delete a single-file checkpoint and its sidecar."""
    path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)


def _read_digests(path: Path, flag: str) -> dict[str, Any]:
    """A digest file (a sidecar or a dir's ``digests.json``), refused unless it is ours."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SelftrainError(f"{flag} {path}: not a readable digest file ({type(error).__name__})"
                             "; it was damaged: delete it to load the file unverified") from None
    if not isinstance(record, dict) or record.get("algorithm") != ALGORITHM:
        raise SelftrainError(f"{flag} {path}: not a digest file of this project (algorithm "
                             f"{ALGORITHM}); delete it to load the file unverified")
    return record


def verify(path: Path, flag: str) -> bool:
    """Check a checkpoint or export against the digests saved with it.

    Args:
        path: a single file (its sidecar is read) or a directory (its ``digests.json``).
        flag: the flag the path came from, named in the refusal.

    Returns:
        True when verified; False when no digests were saved with it (nothing to check).

    Raises:
        SelftrainError: a file differs from its digest, is missing, or the digests are
            unreadable.
    """
    if not path.exists():
        return False  # the reader says the file is missing
    path = path.resolve()  # a link (``--checkpoint.save_last link``): its target's digest
    listing = digest_file(path)
    if not listing.is_file():
        return False
    if path.is_dir():
        files = _read_digests(listing, flag).get("files")
        if not isinstance(files, dict):
            raise SelftrainError(f"{flag} {listing}: lists no files; delete it to load "
                                 f"{path} unverified")
        check_files(path, files, flag, DIGESTS_FILE,
                    f"{DAMAGED} (changed on purpose? delete {DIGESTS_FILE})")
        return True
    accepted = _read_digests(listing, flag).get("accepted")
    if not isinstance(accepted, list):
        raise SelftrainError(f"{flag} {listing}: lists no digest; delete it to load {path} "
                             "unverified")
    if file_digest(path) not in accepted:
        raise SelftrainError(f"{flag} {path}: does not match the digest saved beside it "
                             f"({listing.name}); {DAMAGED} (changed on purpose? delete "
                             f"{listing.name})")
    return True


_VERIFIED: set[tuple[str, int]] = set()


def verify_model_dir(path: Path, flag: str) -> None:
    """:func:`verify` a local model dir that carries digests, once per process.

    The tokenizer and the weights of one export load in turn, and ``evaluate`` checks its
    exports before it starts; each dir is read and hashed once (until its digests change).

    Args:
        path: a local model dir (an export, a planted model); without digests, nothing is done.
        flag: the flag the dir came from.
    """
    listing = path / DIGESTS_FILE
    if not listing.is_file():
        return
    key = (str(path.resolve()), listing.stat().st_mtime_ns)
    if key not in _VERIFIED:
        verify(path, flag)
        _VERIFIED.add(key)
