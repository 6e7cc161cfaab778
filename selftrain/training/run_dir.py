"""One run per run dir: what a run dir holds, which checkpoint resumes it, and whose it is.

A run dir (``--trainer.default_root_dir``) holds one training run: ``tb/``, ``checkpoints/``,
``eval/`` and ``hf/``. A second ``selftrain fit`` into it would mix two runs (``last-v1.ckpt``
beside ``last.ckpt``, two runs' curves in one TensorBoard, duplicate evaluation lines), so it
is refused unless the command resumes the run (``--ckpt_path last``) or asks to start it over
(``--overwrite true``).

Every checkpoint records the run's identity (:func:`run_identity`: a fingerprint of the
training rows, the student's spec and revision, the tokenizer's fingerprint) under
:data:`IDENTITY_KEY`; a resume whose corpus, student or tokenizer differs is refused in one
line. Settings that may change on resume (epochs, the callbacks' cadence) are not part of it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from selftrain.errors import SelftrainError
from selftrain.io import remove

RUN_ENTRIES = ("tb", "checkpoints", "eval", "hf")
"""What ``selftrain fit`` writes into a run dir (``checkpoints`` unless moved elsewhere)."""
IDENTITY_KEY = "selftrain_run"
"""Where a checkpoint keeps the identity of the run that wrote it."""
IDENTITY_FIELDS = {"student": "--model.model (with --model.revision)",
                   "tokenizer": "the student's tokenizer",
                   "corpus": "--data.corpus (with --data.subset, --data.max_length)"}
"""Identity field -> the flags that decide it, named when a resume is refused."""
_LAST = re.compile(r"^last(-.*)?$")
"""Lightning's ``--ckpt_path last`` candidates: ``last.ckpt``, ``last-v1.ckpt``, ..."""


def earlier_run(root: Path, checkpoint_dir: Path) -> list[str]:
    """What of an earlier run a run dir holds: its non-empty run entries and checkpoints.

    Args:
        root: the run dir.
        checkpoint_dir: where the run's checkpoints go (``<root>/checkpoints`` by default).

    Returns:
        Paths relative to ``root`` where they lie under it (empty: no earlier run).
    """
    found = [root / name for name in RUN_ENTRIES
             if (root / name).is_dir() and any((root / name).iterdir())]
    if checkpoint_dir.is_dir() and not checkpoint_dir.is_relative_to(root):
        found += sorted(path for path in checkpoint_dir.iterdir() if path.suffix == ".ckpt")
    return [str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
            for path in found]


def remove_earlier_run(root: Path, checkpoint_dir: Path) -> None:
    """Delete an earlier run's entries from a run dir (``--overwrite true``); nothing else.

    Args:
        root: the run dir.
        checkpoint_dir: the run's checkpoint dir; outside ``root`` only its ``*.ckpt`` go.
    """
    for name in RUN_ENTRIES:
        remove(root / name)
    if checkpoint_dir.is_dir():
        for path in checkpoint_dir.iterdir():
            if path.suffix == ".ckpt" or path.name.startswith(".last"):
                remove(path)


def find_last_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The checkpoint ``--ckpt_path last`` resumes: the newest ``last*.ckpt`` (Lightning's rule).

    Args:
        checkpoint_dir: the run's checkpoint dir.
    """
    if not checkpoint_dir.is_dir():
        return None
    candidates = [path for path in checkpoint_dir.iterdir()
                  if path.suffix == ".ckpt" and _LAST.match(path.stem)]
    return max(candidates, key=lambda path: path.stat().st_mtime) if candidates else None


def read_checkpoint_meta(path: Path, flag: str = "--ckpt_path") -> dict[str, Any]:
    """A checkpoint's state without loading its tensors: step, identity, callbacks' state.

    A full checkpoint is memory-mapped (its tensors are not read); a sharded one (a
    directory) keeps everything but the weights in ``meta.pt``.

    Args:
        path: the checkpoint file or sharded checkpoint dir.
        flag: the flag the path came from, named in error messages.

    Raises:
        SelftrainError: the path is missing, or not a readable checkpoint.
    """
    import torch

    if not path.exists():
        raise SelftrainError(f"{flag} {path}: no such checkpoint; give a checkpoint file, or "
                             "last to resume the run dir's newest one")
    source = path / "meta.pt" if path.is_dir() else path
    try:
        meta = torch.load(source, map_location="cpu", weights_only=True,
                          mmap=not path.is_dir())
    except Exception as error:  # torch raises RuntimeError, EOFError, pickle errors, OSError
        raise SelftrainError(f"{flag} {path}: not a readable checkpoint ({type(error).__name__}"
                             "); it is truncated or not a checkpoint: give another one, or "
                             "start over") from None
    if not isinstance(meta, dict) or "global_step" not in meta:
        raise SelftrainError(f"{flag} {path}: not a Lightning checkpoint (no global_step); "
                             "give a checkpoint `selftrain fit` wrote")
    return meta


def rows_fingerprint(rows: list[dict[str, Any]]) -> str:
    """A short hash of the training rows' token ids, in order (what the run trains on).

    Args:
        rows: the data module's rows (``input_ids`` lists, and a synthesizer row's
            ``loss_from``, the first position trained on).
    """
    digest = hashlib.sha256()
    for row in rows:
        ids = np.asarray(row["input_ids"], dtype=np.int64)
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(ids.tobytes())
        if "loss_from" in row:
            digest.update(b"loss_from" + int(row["loss_from"]).to_bytes(8, "little"))
    return digest.hexdigest()[:16]


def run_identity(model_spec: str, revision: str | None, tokenizer_fingerprint: str,
                 rows: list[dict[str, Any]]) -> dict[str, str]:
    """What a run is: the rows it trains on, its student, its tokenizer.

    Args:
        model_spec: ``--model.model``.
        revision: ``--model.revision``.
        tokenizer_fingerprint: the student's tokenizer fingerprint.
        rows: the training rows.
    """
    student = model_spec if revision is None else f"{model_spec}@{revision}"
    return {"student": student, "tokenizer": tokenizer_fingerprint,
            "corpus": rows_fingerprint(rows)}


def check_identity(saved: dict[str, str] | None, current: dict[str, str], path: Path,
                   fields: tuple[str, ...] = tuple(IDENTITY_FIELDS)) -> None:
    """Refuse a checkpoint another run wrote (another corpus, student or tokenizer).

    Args:
        saved: the checkpoint's :data:`IDENTITY_KEY` entry (None: it records none).
        current: :func:`run_identity` of this command.
        path: the checkpoint, named in the message.
        fields: the identity fields to compare (validate and test check the student only).
    """
    if saved is None:
        raise SelftrainError(f"--ckpt_path {path}: records no selftrain run identity (another "
                             "program or an older selftrain wrote it); give a checkpoint this "
                             "version of `selftrain fit` wrote")
    for field in fields:
        if saved.get(field) != current.get(field):
            raise SelftrainError(
                f"--ckpt_path {path}: was written by a run with another {field} "
                f"({saved.get(field)}; this command gives {current.get(field)}); resume with the "
                f"run's own {IDENTITY_FIELDS[field]}, or train in a new run dir")
