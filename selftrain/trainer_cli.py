"""`SelftrainCLI`: LightningCLI over StudentLM and CorpusDataModule, with the run layout.

Everything of a run goes under ``--trainer.default_root_dir`` (``runs/default`` unless set):
``tb/`` (TensorBoard events and the resolved ``config.yaml``), ``checkpoints/`` (``last.ckpt``,
refreshed every ``--checkpoint.every_n_train_steps`` and at each epoch end) and ``hf/epoch=N``
(HF exports). Resume a killed run with the same command plus ``--ckpt_path last``.

One run per run dir (:mod:`selftrain.training.run_dir`): a ``fit`` into a run dir that already
holds a run is refused unless it resumes it (``--ckpt_path last``) or starts it over
(``--overwrite true``); a resume must be of the same run (corpus, student, tokenizer), and the
checkpoint is read and checked before anything is written. A resume purges from TensorBoard
what the killed process logged after its checkpoint, so every curve holds each step once.

This module builds the CLI: the hooks LightningCLI calls, and its private methods overridden
where it offers no hook (each names the Lightning version it was checked against). What the
run dir, the machine and Ctrl-C call for is decided in :mod:`selftrain.training.run_dir`,
:mod:`selftrain.training.checks` and :mod:`selftrain.training.interrupts`.

``--probes.*`` is the run's probe set, read by every probe callback (ExtractionProbe,
LikelihoodTracker) that names no ``probe_set`` of its own, so a config writes the probe set and
its window once and one flag swaps it for both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from selftrain.callbacks.epoch_eval import EpochEvaluation, check_base_evaluations
from selftrain.callbacks.probe_eval import (
    ProbeEvaluation,
    SharedProbeSet,
    mark_shared,
    share_probe_set,
)
from selftrain.callbacks.run_checkpoint import RunCheckpoint
from selftrain.callbacks.tb_layout import TensorBoardLayout, wait_to_sort_last
from selftrain.curation.leaks import LeakCheck, check_ngram, find_leaks, refuse_leaks
from selftrain.errors import SelftrainError
from selftrain.precision import trainer_precision
from selftrain.training.checkpoint_io import AtomicCheckpointIO
from selftrain.training.checks import check_gpu_request, check_trainer
from selftrain.training.data import CorpusDataModule
from selftrain.training.flags import check_seed_everything, check_trainer_flags
from selftrain.training.interrupts import NOTHING_KEPT, fit_interrupted, run_interruptible
from selftrain.training.module import StudentLM
from selftrain.training.run_dir import (
    IDENTITY_KEY,
    check_identity,
    is_local_checkpoint,
    plan_run,
    prepare_fit,
    read_verified_meta,
    run_inputs,
    write_run_marker,
)
from selftrain.training.trainer import SelftrainTrainer

DEFAULT_ROOT = "runs/default"
TRAINER_SUBCOMMANDS = ("fit", "validate", "test")


class SelftrainCLI(LightningCLI):
    """LightningCLI with the student's tokenizer linked into the data and a fixed run layout."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        """Build and (by default) run the CLI.

        Args:
            args: command-line arguments; None reads ``sys.argv``.
            run: run the subcommand after instantiating the classes.
        """
        super().__init__(
            StudentLM,
            CorpusDataModule,
            args=args,
            run=run,
            trainer_class=SelftrainTrainer,  # --trainer.precision auto
            save_config_kwargs={"overwrite": True},
            # parse errors raise, and selftrain.cli prints them as one line
            parser_kwargs={"prog": "selftrain", "exit_on_error": False,
                           **{name: {"exit_on_error": False} for name in TRAINER_SUBCOMMANDS}},
            trainer_defaults={"use_distributed_sampler": False,
                              "callbacks": [TensorBoardLayout()]},
        )

    # Overrides a private method of LightningCLI, checked against lightning 2.6.6, which calls
    # it right after parsing, before any hook (tests/test_fit.py fails if it is gone).
    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` first; merge its hyperparameters for validate and test only.

        LightningCLI (2.6.6) loads a ``--ckpt_path`` file whole and overwrites the command's
        ``--model.*`` with the hyperparameters saved in it. A missing or truncated file would
        end in its traceback, so it is read (memory-mapped) and checked here first. For
        ``fit`` the command's own flags stay what runs, and a checkpoint of another run is
        refused by the run-identity check instead of silently training the checkpoint's
        student; ``validate`` and ``test`` still take the student from the checkpoint.
        """
        subcommand = self.config.get("subcommand")
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        if is_local_checkpoint(ckpt):
            self._checkpoint_meta(Path(ckpt))
        if subcommand != "fit":
            super()._parse_ckpt_path()

    # Overrides a private method of LightningCLI, checked against lightning 2.6.6, which seeds
    # there before any hook runs (tests/test_fit.py fails if it or ``_get`` is gone).
    def _set_seed(self) -> None:
        """Check ``--seed_everything`` first: Lightning seeds before any other hook runs."""
        check_seed_everything(self._get(self.config, "seed_everything"))
        super()._set_seed()

    def _checkpoint_meta(self, path: Path) -> dict[str, Any]:
        """``--ckpt_path``'s state without its tensors, read once (it is checked, then used)."""
        cached = getattr(self, "_read_meta", None)
        if cached is None or cached[0] != path:
            subcommand = self.config.get("subcommand")
            config = self.config[subcommand] if subcommand else self.config
            trusted = config.get("weights_only") is False  # --weights_only false, warned about
            self._read_meta = (path, read_verified_meta(path, weights_only=not trusted))
        return self._read_meta[1]

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the student's spec into the data; add the checkpoint callback and probe set."""
        parser.link_arguments("model.model", "data.tokenizer")
        parser.link_arguments("model.revision", "data.revision")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_class_arguments(SharedProbeSet, "probes", instantiate=False)
        parser.add_class_arguments(LeakCheck, "leak_check", instantiate=False)
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: start over in a run dir that holds an earlier run, "
                                 "deleting its tb/, checkpoints/, eval/ and hf/ (without it "
                                 "such a run dir is refused unless --ckpt_path resumes it)")
        parser.add_argument("--base_evaluations", type=str | None, default=None,
                            help="fit: a run dir holding an evaluation of this run's base "
                                 "model under this config (selftrain evaluate --model BASE "
                                 "--fit_config CONFIG --out DIR); the benchmarks take their "
                                 "epoch-0 scores from it instead of evaluating the base again, "
                                 "so many fits from one base evaluate it once")
        parser.set_defaults({
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 0,
            "checkpoint.every_n_train_steps": 50,
        })

    def before_instantiate_classes(self) -> None:
        """Resolve precision ``auto``; put the logger and checkpoints under the run dir.

        ``--trainer.precision auto`` is resolved here so that the saved config records what
        runs; the run's probe set is shared with the callbacks that read it.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_trainer_flags(config.trainer, config.get("checkpoint"))
        if config.get("leak_check") is not None:
            check_ngram(config.leak_check.ngram, "--leak_check.ngram")
        if config.trainer.precision == "auto":
            config.trainer.precision = trainer_precision("auto", config.trainer.accelerator)
        if config.get("base_evaluations") is not None:
            check_base_evaluations(Path(config.base_evaluations), str(config.model.model))
        share_probe_set(config.trainer.callbacks, config.get("probes"))
        root = config.trainer.default_root_dir or DEFAULT_ROOT
        config.trainer.default_root_dir = root
        if config.trainer.logger in (None, True):
            # validate and test log into a sub-run of their own (tb/validate, tb/test), so a
            # fit's config.yaml and hparams.yaml in tb/ are never written over
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(save_dir=root, name="tb",
                                    version=(self.subcommand if self.subcommand
                                             in ("validate", "test") else ""),
                                    default_hp_metric=False))
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        if config.get("weights_only") is False:
            rank_zero_warn("--weights_only false: the checkpoint is unpickled, which runs any "
                           "code it carries; use it only on checkpoints you trust")
        self._plan_run(config)

    def _plan_run(self, config: Namespace) -> None:
        """The run dir's plan (:func:`~selftrain.training.run_dir.plan_run`), in the config.

        Sets what :meth:`before_fit` acts on (``self.plan``) before anything is built or
        written; the checkpoint resolved from ``--ckpt_path last`` is the one that loads.
        """
        fit = self.subcommand == "fit"
        self.plan = plan_run(self.subcommand, Path(config.trainer.default_root_dir),
                             Path(config.checkpoint.dirpath), config.get("ckpt_path"),
                             bool(config.get("overwrite")), inputs=run_inputs(config),
                             first_rank=getattr(rank_zero_only, "rank", 0) == 0,
                             read_meta=self._checkpoint_meta)
        if self.plan.ckpt_path != config.get("ckpt_path"):
            config.ckpt_path = self.plan.ckpt_path
        if fit:
            config.overwrite = False  # not saved as set
        if fit and self.plan.resume_step is not None \
                and isinstance(config.trainer.logger, Namespace) \
                and config.trainer.logger.class_path.endswith("TensorBoardLogger"):
            # TensorBoard drops what the killed process logged at or after the checkpoint's
            # step; the evaluation callbacks log again what the checkpoint holds at that step
            # (their by-epoch sub-run, tb/by_epoch, they purge themselves: its steps are
            # epochs, see selftrain.callbacks.tb_layout.resume_epoch)
            config.trainer.logger.init_args.purge_step = self.plan.resume_step

    def after_instantiate_classes(self) -> None:
        """Probe callbacks that read the run's probe set name ``--probes.*`` in messages."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        mark_shared(self.trainer.callbacks, config.get("probes"))
        if config.get("base_evaluations") is not None:
            for callback in self.trainer.callbacks:
                if isinstance(callback, EpochEvaluation):
                    callback.base_from = Path(config.base_evaluations)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (the student has nothing to predict)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The Trainer, with atomic local checkpoint writes unless a plugin already sets them."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        check_gpu_request({**config.get("trainer", {}), **kwargs})
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as error:  # Lightning refused a flag
            first = " ".join(str(error).split())
            raise SelftrainError(f"--trainer: Lightning refuses these trainer flags: {first}"
                                 ) from None
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def check_machine(self) -> None:
        """Refuse a strategy, precision or module setting this machine cannot run.

        Runs before any weights are loaded or anything is written.
        """
        check_trainer(self.trainer)
        self.model.check_machine(self.trainer)

    def before_fit(self) -> None:
        """Check the machine, the corpus, the run and every callback's inputs, then clear.

        Only once everything is checked does an earlier run (``--overwrite true``, or one
        that died before its first checkpoint) leave the run dir.
        """
        self.check_machine()
        self.datamodule.load()
        for callback in self.trainer.callbacks:
            if isinstance(callback, EpochEvaluation):
                callback.ensure_checked(self.trainer, self.model)
        self.model.run_identity = self.model.identity(self.datamodule.rows)
        config = self.config_init[self.subcommand]
        leaks = self._check_probe_leaks(config)
        plan = self.plan
        if plan.resume_meta is not None:
            check_identity(plan.resume_meta.get(IDENTITY_KEY), self.model.run_identity,
                           Path(plan.ckpt_path))
            for callback in self.trainer.callbacks:
                if isinstance(callback, SaveConfigCallback):  # the run's first config stays
                    callback.config_filename = f"config.resumed-at-step={plan.resume_step}.yaml"
            log_dir = getattr(self.trainer.logger, "log_dir", None)
            if log_dir is not None:  # the resume's purge must be read after the crashed events
                wait_to_sort_last(Path(log_dir))
        if self.trainer.is_global_zero:
            prepare_fit(plan, Path(config.trainer.default_root_dir),
                        Path(config.checkpoint.dirpath))
        if plan.resume_meta is None and self.trainer.logger is not None:
            # what the run trains on, once at step 0 (the report's run table reads it)
            mixture = self.datamodule.stats.get("mixture", [])
            self.trainer.logger.log_metrics({
                "data/train_rows": len(self.datamodule.rows),
                "data/train_tokens": self.datamodule.stats["tokens"], **leaks,
                # per corpus of a mixture: its tokens an epoch and passes over its rows
                **{f"data/corpus{j}_{key}": record[key] for j, record in enumerate(mixture)
                   for key in ("tokens", "passes")}}, step=0)

    def _check_probe_leaks(self, config: Namespace) -> dict[str, int]:
        """Refuse training rows that share a token n-gram with a probe window of the run.

        Every probe set a probe callback loaded (in the student's tokenizer) is checked against
        the rows the student trains on, unless ``--leak_check.allow_probe_leaks true``.

        Returns:
            ``data/probe_leak_rows`` and ``data/probe_leak_windows`` summed over the probe
            sets; empty without a probe set (nothing was checked).
        """
        settings = config.get("leak_check") or LeakCheck()
        probe_sets = {callback.probes.fingerprint(): callback.probes
                      for callback in self.trainer.callbacks
                      if isinstance(callback, ProbeEvaluation) and callback.probes is not None}
        if not probe_sets:
            return {}
        rows = [row["input_ids"] for row in self.datamodule.rows]
        leaking, windows = np.zeros(len(rows), dtype=bool), 0
        corpus = self.datamodule.hparams.corpus
        for probes in probe_sets.values():
            leaks = find_leaks(rows, probes.input_ids.tolist(), settings.ngram)
            refuse_leaks(leaks, corpus if isinstance(corpus, str) else " ".join(corpus),
                         probes.path, settings.allow_probe_leaks)
            record = leaks.record()
            leaking |= leaks.rows
            windows += record["windows_leaked"]
            if record["rows_leaking"]:
                rank_zero_warn(f"--leak_check.allow_probe_leaks true: {record['rows_leaking']} "
                               f"training rows share a {settings.ngram}-token n-gram with "
                               f"{record['windows_leaked']} windows of {probes.path}")
        return {"data/probe_leak_rows": int(leaking.sum()), "data/probe_leak_windows": windows}

    def before_validate(self) -> None:
        """Evaluation needs a held-out corpus; say so before loading anything."""
        if self.datamodule.hparams.eval_corpus is None:
            raise SelftrainError(f"selftrain {self.subcommand} needs --data.eval_corpus "
                                 "(a held-out corpus dir or file)")
        self.check_machine()
        self.datamodule.load()
        if self.plan.resume_meta is not None:
            check_identity(self.plan.resume_meta.get(IDENTITY_KEY),
                           self.model.identity(self.datamodule.eval_rows),
                           Path(self.plan.ckpt_path), fields=("student", "tokenizer"))
        if self.trainer.is_global_zero:
            write_run_marker(Path(self.config_init[self.subcommand].trainer.default_root_dir),
                             self.subcommand)

    before_test = before_validate

    # LightningCLI (2.6.6, ``_run_subcommand``) calls a method named after the subcommand in
    # place of the Trainer's own (tests/test_fit.py fails if it stops looking one up).
    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit``; Ctrl-C ends it with one line saying how to resume, and status 130.

        Args:
            kwargs: ``trainer.fit``'s arguments, as LightningCLI gathered them.
        """
        checkpoint_dir = Path(self.config_init[self.subcommand].checkpoint.dirpath)
        run_interruptible(self.trainer, self.trainer.fit, kwargs,
                          lambda: fit_interrupted(self.trainer.global_step, checkpoint_dir))

    def validate(self, **kwargs: Any) -> None:
        """``trainer.validate``; Ctrl-C ends it with one line and status 130.

        Args:
            kwargs: ``trainer.validate``'s arguments, as LightningCLI gathered them.
        """
        run_interruptible(self.trainer, self.trainer.validate, kwargs, lambda: NOTHING_KEPT)

    def test(self, **kwargs: Any) -> None:
        """``trainer.test``; Ctrl-C ends it with one line and status 130.

        Args:
            kwargs: ``trainer.test``'s arguments, as LightningCLI gathered them.
        """
        run_interruptible(self.trainer, self.trainer.test, kwargs, lambda: NOTHING_KEPT)
