"""`AtomicCheckpointIO`: a checkpoint is either the old file or the complete new one.

Lightning's default save goes through an fsspec transaction, which for local paths writes to
the system temp dir and then *moves* the file; when the temp dir is another filesystem the move
is a copy, and a SIGKILL during it leaves a truncated ``last.ckpt``. Local saves here go through
:func:`selftrain.digests.save_with_digest` (written beside the target, fsynced, renamed over
it, with the digest of its bytes in ``last.ckpt.digest.json`` beside it, which every command
that reads the checkpoint back checks first). Remote URLs and saves with ``storage_options``
keep Lightning's behaviour.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from typing_extensions import override

from selftrain.digests import remove_with_digest, save_with_digest


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic (write beside, fsync, rename)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path``; a local path is replaced only once it is complete.

        Args:
            checkpoint: the state Lightning gathered.
            path: the checkpoint file (a local path or a URL).
            storage_options: fsspec options; given, the save is Lightning's own.
        """
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        def write(staging: Path) -> None:
            with staging.open("wb") as handle:
                torch.save(checkpoint, handle)

        save_with_digest(path, write)

    @override
    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        """Delete a checkpoint and, for a local file, the digest beside it.

        Args:
            path: the checkpoint (a local path or a URL).
        """
        if "://" in str(path) or Path(path).is_dir():
            return super().remove_checkpoint(path)
        remove_with_digest(Path(path))
