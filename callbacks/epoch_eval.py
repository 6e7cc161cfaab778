"""`EpochEvaluation`: the cadence, logging and bookkeeping every evaluation callback shares.

The paper's curves are deltas from the base model, so every evaluation runs once before the
first optimizer step (epoch 0, global step 0) and then after every ``every_n_epochs``-th epoch,
always including the last one: the epoch that ends training, whichever limit ends it
(``max_epochs``, ``max_steps`` even mid-epoch, or a callback that stops the run). A
subclass only says what to measure (:meth:`evaluate`) and what to check before training
(:meth:`check`); this class

- runs :meth:`check` once in ``setup``, so bad input fails before any epoch is trained
  (``selftrain fit`` calls it even earlier, before the run dir is written);
- skips the epoch-0 pass when a run resumes at a later step;
- takes the epoch-0 pass from an earlier evaluation of the same base model instead of
  repeating it, when the run names one (``selftrain fit --base_evaluations DIR``) and the
  subclass can adopt it (:meth:`adopt_base`): a sweep of many students from one base
  evaluates that base once;
- switches the student to eval mode, disables grad, enters the Trainer's precision context
  (bf16 autocast under ``bf16-mixed``), and restores train mode afterwards;
- evaluates at an explicit point of the run, :meth:`evaluate_at` (epochs completed and the
  global step the student was trained to): the epoch hooks pass the Trainer's own, and
  ``selftrain evaluate`` the ones an export was written at, so nothing outside training
  touches Lightning's loop counters;
- logs the returned scalars to every logger at that global step, beside
  ``eval/epochs_completed`` (the epoch axis) and ``eval_time/<name>`` (seconds spent), and
  to a TensorBoard logger also against the epoch, as ``by_epoch/<tag>`` in the sub-run
  ``<run>/tb/by_epoch/``, charting new tags on the run's custom-scalars page
  (:mod:`selftrain.callbacks.tb_layout`);
- appends one JSON line per evaluation to ``<run>/eval/<name>.jsonl``;
- keeps that history in every checkpoint, so a resumed run holds each evaluation exactly
  once: on resume the file is rewritten from the checkpoint's history (dropping what the
  killed process evaluated after its checkpoint, which is evaluated again), and what the
  checkpoint holds at its own step is logged again, since ``selftrain fit`` purges
  TensorBoard from that step on (and the by-epoch sub-run from the first epoch not evaluated
  before that step, :func:`~selftrain.callbacks.tb_layout.resume_epoch`).

Every rank calls :meth:`evaluate`; a subclass shards its work or lets rank 0 do it, and makes
sure all ranks take part in the same collectives.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from selftrain.callbacks.tb_layout import (
    close_boards,
    resume_epoch,
    run_board,
    tensorboard_loggers,
)
from selftrain.errors import SelftrainError
from selftrain.inputs import read_json_records
from selftrain.io import write_text_atomic
from selftrain.training.fsdp import consolidated_state_dict, is_sharded, unsharded_copy

EPOCH_TAG = "eval/epochs_completed"


class EpochEvaluation(Callback):
    """Base class: evaluate at epoch 0 and after every n-th epoch (the last one included).

    Args:
        every_n_epochs: evaluate after every n-th training epoch; the last epoch always is.
        run_at_start: evaluate the base model before the first optimizer step (epoch 0).
    """

    name = "eval"
    """Short name: the ``eval_time/<name>`` tag and ``<run>/eval/<name>.jsonl``."""
    adopts_base = False
    """Whether :meth:`adopt_base` can take epoch 0 from ``--base_evaluations``: true where the
    epoch-0 numbers depend on nothing but the base model and the callback's own settings."""

    def __init__(self, every_n_epochs: int = 1, run_at_start: bool = True) -> None:
        if every_n_epochs < 1:
            raise SelftrainError(f"{self.flag('every_n_epochs')} {every_n_epochs}: must be >= 1")
        self.every_n_epochs = every_n_epochs
        self.run_at_start = run_at_start
        self.seconds = 0.0
        self.evaluations = 0
        self.history: list[dict[str, Any]] = []
        """This run's evaluations, one record per line of ``<run>/eval/<name>.jsonl``."""
        self._restored_history: list[dict[str, Any]] | None = None
        self._resume_step: int | None = None
        self._checked = False
        self.base_from: Path | None = None
        """An earlier evaluation of this run's base model (``selftrain fit --base_evaluations``):
        a run dir whose epoch-0 record :meth:`adopt_base` takes instead of evaluating again."""

    def flag(self, name: str) -> str:
        """How a constructor argument is spelled in messages (``init_args.<name>`` of the class)."""
        return f"{type(self).__name__}.{name}"

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validate the inputs against the student before training; raise SelftrainError.

        Called once (by ``selftrain fit`` before anything is written, else in ``setup``).
        """

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int,
                 step: int) -> dict[str, float]:
        """Measure the current student; return ``tag -> value`` (logged by rank 0).

        Args:
            trainer: the Trainer the student is attached to.
            pl_module: the student (in eval mode, grad off, precision context entered).
            epoch: epochs completed (0: the base model, before any optimizer step).
            step: the global step the student was trained to (file names, and which weights
                these are: the same student at the same step has the same weights).
        """
        raise NotImplementedError

    def adopt_base(self, trainer: L.Trainer, pl_module: L.LightningModule,
                   base_dir: Path) -> None:
        """Take an earlier epoch-0 evaluation of the base as this run's (``adopts_base`` only).

        Checks that the evaluation was made under this callback's settings, restores the state
        its deltas need and copies the evaluation's files into this run.

        Args:
            trainer: the Trainer, before the first optimizer step.
            pl_module: the student (still the base model).
            base_dir: ``--base_evaluations``.
        """
        raise NotImplementedError

    def ensure_checked(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Run :meth:`check` once."""
        if not self._checked:
            self.check(trainer, pl_module)
            self._checked = True

    @staticmethod
    def run_dir(trainer: L.Trainer) -> Path:
        """The run's root dir (``--trainer.default_root_dir``)."""
        return Path(trainer.default_root_dir)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.ensure_checked(trainer, pl_module)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_history = list(state_dict.get("history", []))

    def history_path(self, trainer: L.Trainer) -> Path:
        """``<run>/eval/<name>.jsonl``."""
        return self.run_dir(trainer) / "eval" / f"{self.name}.jsonl"

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._resume_step = int(checkpoint["global_step"])
        epoch = resume_epoch(checkpoint)
        for logger in tensorboard_loggers(trainer):
            run_board(logger).resume_at(epoch)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the checkpoint's callback states are restored, before training resumes (or,
        # for a finished run, instead of it)
        if self._resume_step is not None:
            self._resume(trainer, self._resume_step)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_at_start and trainer.global_step == 0 and self._resume_step is None:
            if self.base_from is not None and self.adopts_base:
                record = self._base_record()
                self.adopt_base(trainer, pl_module, self.base_from)
                self._keep(trainer, {"epoch": 0, "global_step": 0, "seconds": 0.0,
                                     "metrics": record["metrics"],
                                     "base_from": str(self.base_from.resolve())})
            else:
                self.evaluate_at(trainer, pl_module, epoch=0, step=trainer.global_step)

    def _base_record(self) -> dict[str, Any]:
        """The epoch-0 record of ``base_from``'s ``eval/<name>.jsonl``; refused if none.

        That ``base_from`` evaluated this run's base model was checked before the run dir was
        written (:func:`check_base_evaluations`, by ``selftrain fit``).
        """
        path = self.base_from / "eval" / f"{self.name}.jsonl"
        records = read_json_records(path, "--base_evaluations") if path.is_file() else []
        found = [record for record in records if record.get("epoch") == 0]
        if not found:
            raise SelftrainError(f"--base_evaluations {self.base_from}: holds no epoch-0 "
                                 f"{self.name} evaluation ({path}); write it first with "
                                 "selftrain evaluate --model BASE --fit_config CONFIG --out "
                                 f"{self.base_from}")
        return found[0]

    def _resume(self, trainer: L.Trainer, step: int) -> None:
        """Take the history back to the checkpoint's: the file, and the curves at its step.

        Args:
            trainer: the resuming Trainer.
            step: the checkpoint's global step.
        """
        self.history = self._restored_history or []
        self._restored_history = None
        for logger in tensorboard_loggers(trainer):
            board = run_board(logger)
            board.chart(tag for record in self.history for tag in record["metrics"])
            board.writer()  # the by-epoch sub-run's purge, even if nothing is logged again
        for record in self.history:
            if record["global_step"] >= step:
                self._log(trainer, record)
        if trainer.is_global_zero:
            lines = "".join(json.dumps(record) + "\n" for record in self.history)
            write_text_atomic(lines, self.history_path(trainer))

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs == 0 or training_ends(trainer):
            self.evaluate_at(trainer, pl_module, epoch=epoch, step=trainer.global_step)

    @staticmethod
    @contextmanager
    def evaluation_mode(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
        """Eval mode, no grad and the Trainer's precision context; train mode restored after.

        Under FSDP the student's weights are sharded and its layers all-gather inside their
        own forward, which every rank would have to call in lockstep. Instead every rank
        gathers the full weights once and ``pl_module.model`` is, for the evaluation, a plain
        unsharded copy in FSDP's compute dtype; the sharded student is put back afterwards.
        """
        was_training = pl_module.training
        sharded_student = None
        if is_sharded(trainer):
            sharded_student = pl_module.model
            mixed = trainer.strategy.mixed_precision_config
            pl_module.model = unsharded_copy(sharded_student, consolidated_state_dict(trainer),
                                             dtype=mixed.param_dtype if mixed else None)
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                yield
        finally:
            if sharded_student is not None:
                pl_module.model = sharded_student
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            pl_module.train(was_training)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int,
                step: int) -> dict[str, float]:
        """:meth:`evaluate` in :meth:`evaluation_mode`, nothing logged or recorded.

        ``selftrain evaluate`` measures a base it does not record this way (its deltas need
        it).

        Args:
            trainer: the Trainer the student is attached to.
            pl_module: the student.
            epoch: epochs completed.
            step: the global step the student was trained to.
        """
        with self.evaluation_mode(trainer, pl_module):
            return self.evaluate(trainer, pl_module, epoch, step)

    def evaluate_at(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int,
                    step: int) -> dict[str, Any]:
        """Evaluate the student at one point of the run, log it at ``step`` and record it.

        The epoch hooks call it with the Trainer's epoch and global step; ``selftrain
        evaluate`` with those an export was written at.

        Args:
            trainer: the Trainer the student is attached to.
            pl_module: the student.
            epoch: epochs completed (the ``eval/epochs_completed`` value).
            step: the global step the student was trained to (the x of every scalar, the
                ``global_step`` of the record, the ``step=`` of every file name).

        Returns:
            The record kept: epoch, global step, seconds and metrics.
        """
        start = time.perf_counter()
        metrics = self.measure(trainer, pl_module, epoch, step)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.evaluations += 1
        record = {"epoch": epoch, "global_step": step, "seconds": round(seconds, 3),
                  "metrics": metrics}
        self._keep(trainer, record)
        return record

    def _keep(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        """Record one evaluation: the history, every logger, ``<run>/eval/<name>.jsonl``."""
        self.history.append(record)
        self._log(trainer, record)
        if trainer.is_global_zero:
            history = self.history_path(trainer)
            history.parent.mkdir(parents=True, exist_ok=True)
            with history.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _log(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        """Log one evaluation's scalars to every logger at its global step, and by epoch.

        A TensorBoard logger (global rank 0) also gets them at step = epoch in its by-epoch
        sub-run, and its custom-scalars page charts the tags it did not chart yet.
        """
        timing = {f"eval_time/{self.name}": record["seconds"]}
        scalars = {**record["metrics"], EPOCH_TAG: float(record["epoch"]), **timing}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=record["global_step"])
        for logger in tensorboard_loggers(trainer):
            board = run_board(logger)
            board.log_by_epoch({**record["metrics"], **timing}, epoch=record["epoch"])
            board.chart(record["metrics"])

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        close_boards(trainer)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        close_boards(trainer)


def check_base_evaluations(base_dir: Path, model: str) -> None:
    """Refuse a ``--base_evaluations`` dir that holds no evaluations, or not of ``model``.

    Args:
        base_dir: ``--base_evaluations``.
        model: the run's base (``--model.model``).
    """
    config_path = base_dir / "tb" / "config.yaml"
    if not (base_dir / "eval").is_dir() or not config_path.is_file():
        raise SelftrainError(f"--base_evaluations {base_dir}: holds no evaluations (no eval/ "
                             "and tb/config.yaml); write them first with selftrain evaluate "
                             f"--model BASE --fit_config CONFIG --out {base_dir}")
    config = yaml.safe_load(config_path.read_text())
    theirs = ((config or {}).get("model") or {}).get("model")
    if theirs is None or not same_model(str(theirs), model):
        raise SelftrainError(f"--base_evaluations {base_dir}: evaluated "
                             f"{theirs or 'no model it names'} ({config_path}), not this "
                             f"run's base {model}; point it at an evaluation of {model}")


def same_model(first: str, second: str) -> bool:
    """Whether two model specs name one model: equal, or local paths to the same dir."""
    if first == second:
        return True
    return Path(first).exists() and Path(second).exists() and (
        Path(first).resolve() == Path(second).resolve())


def training_ends(trainer: L.Trainer) -> bool:
    """Whether the epoch that is ending (in ``on_train_epoch_end``) is the last of the fit.

    Training stops after ``max_epochs`` epochs, after ``max_steps`` optimizer steps (then the
    last epoch may be cut short: Lightning still ends it with ``on_train_epoch_end``), or when
    something sets ``should_stop``; -1 (or None) means no such limit, as in Lightning.
    """
    def reached(count: int, limit: int | None) -> bool:
        return limit is not None and limit != -1 and count >= limit

    return (reached(trainer.current_epoch + 1, trainer.max_epochs)
            or reached(trainer.global_step, trainer.max_steps) or trainer.should_stop)
