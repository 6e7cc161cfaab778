"""`AtomicCheckpointIO`: a checkpoint is either the old file or the complete new one.

Lightning's default save goes through an fsspec transaction, which for local paths writes to
the system temp dir and then *moves* the file; when the temp dir is another filesystem the move
is a copy, and a SIGKILL during it leaves a truncated ``last.ckpt``. This writes beside the
target, fsyncs, and ``os.replace``-s it into place (atomic on POSIX). Remote URLs keep
Lightning's behaviour.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from typing_extensions import override


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are write-beside, fsync, rename."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with staging.open("wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)
