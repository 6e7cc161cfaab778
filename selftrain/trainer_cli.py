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

``--probes.*`` is the run's probe set, read by every probe callback (ExtractionProbe,
LikelihoodTracker) that names no ``probe_set`` of its own, so a config writes the probe set and
its window once and one flag swaps it for both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import Accelerator, CUDAAccelerator, MPSAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.strategies import FSDPStrategy
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
from selftrain.callbacks.tb_layout import TensorBoardLayout
from selftrain.curation.leaks import LeakCheck, check_ngram, find_leaks, refuse_leaks
from selftrain.digests import digest_file, verify
from selftrain.errors import Interrupted, SelftrainError
from selftrain.outputs import refuse_input_overlap, refuse_unwritable
from selftrain.precision import device_type, trainer_precision
from selftrain.training.checkpoint_io import AtomicCheckpointIO
from selftrain.training.checks import ampere_or_newer
from selftrain.training.data import CorpusDataModule
from selftrain.training.flags import check_seed_everything, check_trainer_flags
from selftrain.training.fsdp import DecoderLayerFSDP
from selftrain.training.module import StudentLM
from selftrain.training.run_dir import (
    IDENTITY_KEY,
    check_identity,
    earlier_run,
    find_last_checkpoint,
    read_checkpoint_meta,
    refuse_foreign_root,
    remove_earlier_run,
    remove_export_leftovers,
    run_inputs,
    write_run_marker,
)
from selftrain.training.trainer import SelftrainTrainer

log = logging.getLogger(__name__)

DEFAULT_ROOT = "runs/default"
TRAINER_SUBCOMMANDS = ("fit", "validate", "test")
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
"""``--ckpt_path`` values Lightning resolves itself (``last`` for fit is resolved here)."""


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
        if isinstance(ckpt, str) and ckpt not in CKPT_KEYWORDS and "://" not in ckpt:
            self._checkpoint_meta(ckpt)
        if subcommand != "fit":
            super()._parse_ckpt_path()

    def _set_seed(self) -> None:
        """Check ``--seed_everything`` first: Lightning seeds before any other hook runs."""
        check_seed_everything(self._get(self.config, "seed_everything"))
        super()._set_seed()

    def _checkpoint_meta(self, ckpt: str) -> dict[str, Any]:
        """``--ckpt_path``'s state without its tensors, read once (it is checked, then used)."""
        cached = getattr(self, "_read_meta", None)
        if cached is None or cached[0] != ckpt:
            subcommand = self.config.get("subcommand")
            config = self.config[subcommand] if subcommand else self.config
            trusted = config.get("weights_only") is False  # warned about before it is read
            verified = verify(Path(ckpt), "--ckpt_path")  # before anything reads it
            self._read_meta = (ckpt, read_checkpoint_meta(Path(ckpt), weights_only=not trusted))
            if not verified:
                log.warning("--ckpt_path %s: no digest was saved with it (%s); it reads as a "
                            "checkpoint but is not verified", ckpt, digest_file(Path(ckpt)).name)
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
        """Check the run dir and the checkpoint to resume, before anything is built or written.

        Sets what :meth:`before_fit` acts on: the checkpoint's state (``self.resume_meta``)
        and whether an earlier run is to be removed (``self.start_over``).
        """
        root = Path(config.trainer.default_root_dir)
        checkpoint_dir = Path(config.checkpoint.dirpath)
        refuse_unwritable(root, "--trainer.default_root_dir", beside=False)
        refuse_input_overlap(root, run_inputs(config), flag="--trainer.default_root_dir")
        # what the run dir holds is judged by global rank 0 alone: the other ranks of a DDP
        # launch may start after rank 0 wrote the run's marker
        first_rank = getattr(rank_zero_only, "rank", 0) == 0
        if first_rank:
            refuse_foreign_root(root, checkpoint_dir, "--trainer.default_root_dir")
        self.resume_meta: dict[str, Any] | None = None
        self.start_over = False
        ckpt = config.get("ckpt_path")
        if self.subcommand == "fit" and ckpt is not None and config.get("overwrite"):
            raise SelftrainError(f"--overwrite true with --ckpt_path {ckpt}: one starts the run "
                                 "over, the other resumes it; pass only the one you mean")
        found = find_last_checkpoint(checkpoint_dir) if ckpt == "last" else None
        if ckpt == "last" and self.subcommand == "fit":
            if found is None:
                log.info("--ckpt_path last: no checkpoint in %s yet; starting from step 0",
                         checkpoint_dir)
                ckpt = config.ckpt_path = None
                # what a run that died before its first checkpoint logged is redone from step 0
                self.start_over = True
            else:
                ckpt = config.ckpt_path = str(found)
        elif found is not None:
            # validate / test: the file Lightning would pick (its rule), named so it is checked
            ckpt = config.ckpt_path = str(found)
        if ckpt is not None and ckpt not in CKPT_KEYWORDS and "://" not in str(ckpt):
            self.resume_meta = self._checkpoint_meta(ckpt)
        if self.subcommand != "fit":
            return
        overwrite, config.overwrite = config.get("overwrite", False), False  # not saved as set
        if first_rank:
            self._check_earlier_run(root, checkpoint_dir, ckpt, overwrite)
        if self.resume_meta is not None and isinstance(config.trainer.logger, Namespace) \
                and config.trainer.logger.class_path.endswith("TensorBoardLogger"):
            # TensorBoard drops what the killed process logged at or after the checkpoint's
            # step; the evaluation callbacks log again what the checkpoint holds at that step
            # (their by-epoch sub-run, tb/by_epoch, they purge themselves: its steps are
            # epochs, see selftrain.callbacks.tb_layout.resume_epoch)
            config.trainer.logger.init_args.purge_step = int(self.resume_meta["global_step"])

    def _check_earlier_run(self, root: Path, checkpoint_dir: Path, ckpt: str | None,
                           overwrite: bool) -> None:
        """Refuse a fit that would mix two runs in ``root``; note an earlier run to remove."""
        if (self.resume_meta is not None and earlier_run(root, checkpoint_dir)
                and Path(ckpt).resolve().parent != checkpoint_dir.resolve()):
            raise SelftrainError(f"--ckpt_path {ckpt}: is not this run dir's checkpoint, and "
                                 f"{root} already holds a run; resume that one with "
                                 "--ckpt_path last, or continue from this checkpoint in a new "
                                 "run dir")
        if self.resume_meta is None and not self.start_over:
            found = earlier_run(root, checkpoint_dir)
            if found and not overwrite:
                listed = ", ".join(found[:4])
                raise SelftrainError(
                    f"--trainer.default_root_dir {root}: already holds a run ({listed}); resume "
                    "it with --ckpt_path last, start it over with --overwrite true, or give a "
                    "new run dir")
            self.start_over = bool(found)

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
        _check_gpu_request({**config.get("trainer", {}), **kwargs})
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
        trainer = self.trainer
        strategy = trainer.strategy
        if isinstance(strategy, DecoderLayerFSDP):
            strategy.check_machine()
        device = strategy.root_device
        precision = str(trainer.precision)
        if precision.startswith("bf16") and device.type == "cuda" and not ampere_or_newer(device):
            raise SelftrainError(f"--trainer.precision {precision}: "
                                 f"{torch.cuda.get_device_name(device)} has no bf16; use "
                                 "16-mixed (or 32-true)")
        self.model.check_machine(trainer)

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
        root = Path(config.trainer.default_root_dir)
        if self.resume_meta is not None:
            check_identity(self.resume_meta.get(IDENTITY_KEY), self.model.run_identity,
                           Path(config["ckpt_path"]))
            step = int(self.resume_meta["global_step"])
            for callback in self.trainer.callbacks:
                if isinstance(callback, SaveConfigCallback):  # the run's first config stays
                    callback.config_filename = f"config.resumed-at-step={step}.yaml"
            if self.trainer.is_global_zero:  # an export the killed process was writing
                removed = remove_export_leftovers(root)
                if removed:
                    log.info("removed what a killed HF export left in %s/hf: %s", root,
                             ", ".join(removed))
        elif self.start_over and self.trainer.is_global_zero:
            log.info("starting %s over: removing the earlier run's %s", root,
                     ", ".join(earlier_run(root, Path(config.checkpoint.dirpath))))
            remove_earlier_run(root, Path(config.checkpoint.dirpath))
        if self.trainer.is_global_zero:
            write_run_marker(root, "fit")
        if self.resume_meta is None and self.trainer.logger is not None:
            # what the run trains on, once at step 0 (the report's run table reads it)
            self.trainer.logger.log_metrics({
                "data/train_rows": len(self.datamodule.rows),
                "data/train_tokens": self.datamodule.stats["tokens"], **leaks}, step=0)

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
        if self.resume_meta is not None:
            check_identity(self.resume_meta.get(IDENTITY_KEY),
                           self.model.identity(self.datamodule.eval_rows),
                           Path(self.config_init[self.subcommand]["ckpt_path"]),
                           fields=("student", "tokenizer"))
        if self.trainer.is_global_zero:
            write_run_marker(Path(self.config_init[self.subcommand].trainer.default_root_dir),
                             self.subcommand)

    before_test = before_validate

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit``; Ctrl-C ends it with :class:`Interrupted`, saying how to resume.

        Args:
            kwargs: ``trainer.fit``'s arguments, as LightningCLI gathered them.
        """
        self._interruptible(self.trainer.fit, kwargs, self._fit_interrupted)

    def validate(self, **kwargs: Any) -> None:
        """``trainer.validate``; Ctrl-C ends it with one line and status 130.

        Args:
            kwargs: ``trainer.validate``'s arguments, as LightningCLI gathered them.
        """
        self._interruptible(self.trainer.validate, kwargs, _nothing_to_keep)

    def test(self, **kwargs: Any) -> None:
        """``trainer.test``; Ctrl-C ends it with one line and status 130.

        Args:
            kwargs: ``trainer.test``'s arguments, as LightningCLI gathered them.
        """
        self._interruptible(self.trainer.test, kwargs, _nothing_to_keep)

    def _interruptible(self, run: Callable[..., Any], kwargs: dict[str, Any],
                       message: Callable[[], str]) -> None:
        """Run a Trainer entry point; on Ctrl-C raise :class:`Interrupted` with ``message()``.

        Lightning shuts down gracefully on Ctrl-C and then exits with status 1; the CLI turns
        :class:`Interrupted` into one line and status 130.
        """
        try:
            run(**kwargs)
        except SystemExit:
            if not self.trainer.interrupted:
                raise
            raise Interrupted(message()) from None

    def _fit_interrupted(self) -> str:
        """What an interrupted fit kept: the step reached and the last checkpoint's."""
        config = self.config_init[self.subcommand]
        found = find_last_checkpoint(Path(config.checkpoint.dirpath))
        saved = (f"the last checkpoint is at step {read_checkpoint_meta(found)['global_step']}"
                 if found is not None else "no checkpoint was written yet")
        return (f"interrupted at step {self.trainer.global_step}; {saved}: rerun the same "
                "command with --ckpt_path last to resume")


def _nothing_to_keep() -> str:
    """What an interrupted validate or test kept."""
    return "interrupted; it wrote nothing to keep: rerun the command"


def _check_gpu_request(trainer: dict[str, Any]) -> None:
    """Refuse, in one line, a GPU accelerator or FSDP on a machine Lightning would refuse them on.

    Lightning (2.6.6) resolves ``--trainer.accelerator gpu`` (and ``auto``) to MPS where it
    is available, else CUDA, and refuses ``gpu`` with neither; its string-named ``fsdp``
    strategies (and a plain ``FSDPStrategy``) need the accelerator to resolve to CUDA.
    """
    accelerator, strategy = trainer.get("accelerator", "auto"), trainer.get("strategy", "auto")
    name = accelerator.lower() if isinstance(accelerator, str) else None
    if ((name == "gpu" and not (CUDAAccelerator.is_available() or MPSAccelerator.is_available()))
            or (name == "cuda" and not CUDAAccelerator.is_available())):
        raise SelftrainError(f"--trainer.accelerator {accelerator}: this machine has no CUDA GPU "
                             "(FSDP needs one); use --trainer.accelerator cpu, with "
                             "--trainer.strategy ddp for several processes")
    fsdp = (isinstance(strategy, str)
            and strategy.lower() in FSDPStrategy.get_registered_strategies()
            ) or type(strategy) is FSDPStrategy
    if fsdp and not _resolves_to_cuda(accelerator):
        raise SelftrainError("--trainer.strategy fsdp needs CUDA GPUs; on CPU use "
                             "--trainer.strategy ddp (configs/scale/ddp.yaml)")


def _resolves_to_cuda(accelerator: str | Accelerator | None) -> bool:
    """Whether Lightning runs this ``--trainer.accelerator`` on CUDA (MPS wins where present)."""
    return device_type(accelerator) == "cuda"
