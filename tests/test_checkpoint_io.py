"""selftrain.training.checkpoint_io: a checkpoint is the old file or the complete new one.

The FSDP strategy's sharded checkpoints are in ``test_fsdp.py``, the HF export in
``test_export.py``.
"""

import pytest
import torch
from helpers import FailsToSave, cli

from selftrain.training.checkpoint_io import AtomicCheckpointIO


def test_checkpoints_are_written_atomically(tmp_path):
    built = cli(tmp_path / "run", "--checkpoint.every_n_train_steps", "10",
                "--trainer.max_epochs", "1")
    assert isinstance(built.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    with pytest.raises(RuntimeError, match="disk full"):  # a save that dies half-way
        io.save_checkpoint({"step": 2, "blob": b"x" * 100_000, "last": FailsToSave()}, target)
    assert torch.load(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_remote_checkpoint_paths_keep_lightnings_save():
    io, url = AtomicCheckpointIO(), "memory://selftrain-test/run/last.ckpt"
    io.save_checkpoint({"step": 7}, url)
    assert io.load_checkpoint(url)["step"] == 7
    io.remove_checkpoint(url)
