"""The student's HF-format export: ``<run>/hf/epoch=N``, loadable as it is.

``from_pretrained`` and lm-eval's ``--model hf`` read the directory directly: safetensors
weights, the tokenizer, ``selftrain_export.json`` (student spec, epoch, global step) and
``digests.json`` (:mod:`selftrain.digests`, checked by every reader). Under
FSDP every rank takes part in gathering the full weights and rank 0 writes them. The directory
appears whole or not at all (:func:`selftrain.io.atomic_dir`); an existing export of the same
epoch is replaced only once the new one is complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from selftrain.digests import write_dir_digests
from selftrain.io import atomic_dir, write_json_atomic
from selftrain.models import EXPORT_INFO
from selftrain.training.fsdp import consolidated_state_dict, is_sharded, unsharded_copy

__all__ = ["EXPORT_INFO", "export_dir", "export_student", "save_hf"]


def export_dir(trainer: L.Trainer, epoch: int) -> Path:
    """Where the export after ``epoch`` epochs goes: ``<default_root_dir>/hf/epoch=N``."""
    return Path(trainer.default_root_dir) / "hf" / f"epoch={epoch}"


def save_hf(model: nn.Module, tokenizer, target: Path, info: dict[str, Any]) -> None:
    """Write weights, tokenizer and ``info`` to ``target`` atomically.

    Args:
        model: a plain (unsharded) transformers model.
        tokenizer: its tokenizer.
        target: the export directory; replaced if it exists.
        info: written as :data:`EXPORT_INFO`.
    """
    with atomic_dir(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        write_json_atomic(info, staging / EXPORT_INFO)
        write_dir_digests(staging)  # every reader of the export checks them first


def export_student(trainer: L.Trainer, model: nn.Module, tokenizer, info: dict[str, Any],
                   epoch: int) -> Path | None:
    """Export the student after ``epoch`` epochs (every rank calls it; rank 0 writes).

    Args:
        trainer: the running Trainer (strategy, rank, run directory).
        model: the student's transformers model, sharded or not.
        tokenizer: its tokenizer.
        info: what :data:`EXPORT_INFO` records.
        epoch: epochs completed; 0 would be the base model.

    Returns:
        The export directory on rank 0, None elsewhere.
    """
    if is_sharded(trainer):  # every rank takes part in gathering the full weights
        state = consolidated_state_dict(trainer, rank0_only=True)
        if trainer.is_global_zero:
            model = unsharded_copy(model, state)
    if not trainer.is_global_zero:
        return None
    target = export_dir(trainer, epoch)
    save_hf(model, tokenizer, target, info)
    rank_zero_info(f"exported HF weights + tokenizer to {target}")
    return target
