"""`RunCheckpoint`: mid-epoch checkpoints *and* a fresh ``last.ckpt`` at every epoch end.

Lightning's ModelCheckpoint saves either every N steps or every N epochs, not both. Long
epochs need the step trigger (a killed job loses at most N steps), and ``--ckpt_path last``
must also find the state of the last finished epoch, or a completed run would resume and
retrain its tail. This subclass keeps the step trigger and refreshes ``last.ckpt`` when an
epoch ends (skipped when a step checkpoint was just written at the same global step).
Writes are atomic through :class:`selftrain.training.checkpoint_io.AtomicCheckpointIO`.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is also refreshed at the end of every epoch."""

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
