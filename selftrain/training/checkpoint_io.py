"""`AtomicCheckpointIO`: a checkpoint is either the old file or the complete new one.

Lightning's default save goes through an fsspec transaction, which for local paths writes to
the system temp dir and then *moves* the file; when the temp dir is another filesystem the move
is a copy, and a SIGKILL during it leaves a truncated ``last.ckpt``. Local saves here go through
:func:`selftrain.io.atomic_file` (written beside the target, fsynced, renamed over it). Remote
URLs and saves with ``storage_options`` keep Lightning's behaviour.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from typing_extensions import override

from selftrain.io import atomic_file


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
        with atomic_file(path) as staging, staging.open("wb") as handle:
            torch.save(checkpoint, handle)
