"""`RunCheckpoint`: mid-epoch checkpoints *and* a fresh ``last.ckpt`` at every epoch end.

Lightning's ModelCheckpoint saves either every N steps or every N epochs, not both. Long
epochs need the step trigger (a killed job loses at most N steps), and ``--ckpt_path last``
must also find the state of the last finished epoch, or a completed run would resume and
retrain its tail. This subclass keeps the step trigger and refreshes ``last.ckpt`` when an
epoch ends, through Lightning's public API only:

- it writes with ``trainer.save_checkpoint`` to ModelCheckpoint's ``last_model_path`` (the
  run's checkpoint IO, :class:`selftrain.training.checkpoint_io.AtomicCheckpointIO`, makes
  the write atomic) and tells the loggers, as ModelCheckpoint does after a save;
- it skips the refresh as ModelCheckpoint skips a save: never twice at the same global step
  (ModelCheckpoint's own saves are noted through the ``on_save_checkpoint`` hook, which
  Lightning calls for every full checkpoint; with ``save_weights_only`` it is not called, and
  a refresh may rewrite a step's checkpoint once more), never before the first step, during
  the sanity check or under ``fast_dev_run``;
- it leaves the step trigger out on an epoch's last batch (and the fit's last step): the
  epoch-end refresh saves that step a moment later, after the epoch's evaluations, so a
  checkpoint at an epoch's end always holds them and a resume never evaluates that step again;
- before ModelCheckpoint has written ``last.ckpt`` once in this run (no ``last_model_path``
  yet), the refresh is ModelCheckpoint's own ``on_train_end``, which writes it exactly when
  nothing was saved yet, choosing its name (and version) as every later save will;
- a run dir that was moved or copied before its resume keeps writing its own ``last.ckpt``:
  ModelCheckpoint forgets ``last_model_path`` when the saved ``dirpath`` differs from the
  current one, and would then version the next save as ``last-v1.ckpt`` beside it (two
  checkpoints in one run dir, the newest found by modification time); the same file name in
  the current dir is taken instead.

Checked against lightning 2.6.6.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is also refreshed at the end of every epoch."""

    _noting = False
    """Inside one of ModelCheckpoint's saving hooks: its saves are noted."""
    _saved_step = 0
    """Global step of the newest checkpoint this callback wrote; 0: none is due before a step."""
    _refreshed = False
    """An epoch-end refresh wrote ``last.ckpt`` itself, so ``on_train_end`` has nothing to do."""

    @contextmanager
    def _noting_saves(self) -> Iterator[None]:
        self._noting = True
        try:
            yield
        finally:
            self._noting = False

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_dir, saved_last = state_dict.get("dirpath"), state_dict.get("last_model_path")
        moved = saved_dir is not None and saved_dir != self.dirpath
        with warnings.catch_warnings():
            if moved:  # handled here: the run keeps its own last.ckpt
                warnings.filterwarnings("ignore", message="The dirpath has changed")
            super().load_state_dict(state_dict)
        if moved and saved_last and self.dirpath is not None:
            here = os.path.join(self.dirpath, os.path.basename(saved_last))
            if os.path.isfile(here):
                self.last_model_path = here

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._noting:
            self._saved_step = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.save_last and ends_epoch(trainer, batch_idx):
            return  # on_train_epoch_end saves this step, after the evaluations at it
        with self._noting_saves():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with self._noting_saves():
            super().on_validation_end(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with self._noting_saves():
            super().on_train_epoch_end(trainer, pl_module)
        if (not self.save_last or trainer.sanity_checking or trainer.fast_dev_run
                or self._saved_step == trainer.global_step):
            return
        if not self.last_model_path:
            with self._noting_saves():
                super().on_train_end(trainer, pl_module)
            return
        trainer.save_checkpoint(self.last_model_path, self.save_weights_only)
        self._saved_step = trainer.global_step
        self._refreshed = True
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._refreshed:
            super().on_train_end(trainer, pl_module)


def ends_epoch(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the batch that just ended is the epoch's last (or the fit's last step)."""
    limit = trainer.max_steps
    return (batch_idx + 1 >= trainer.num_training_batches
            or (limit not in (None, -1) and trainer.global_step >= limit))
