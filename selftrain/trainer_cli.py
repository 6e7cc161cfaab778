"""`SelftrainCLI`: LightningCLI over StudentLM and CorpusDataModule, with the run layout.

Everything of a run goes under ``--trainer.default_root_dir`` (``runs/default`` unless set):
``tb/`` (TensorBoard events and the resolved ``config.yaml``), ``checkpoints/`` (``last.ckpt``,
refreshed every ``--checkpoint.every_n_train_steps`` and at each epoch end) and ``hf/epoch=N``
(HF exports). Resume a killed run with the same command plus ``--ckpt_path last``.

``--probes.*`` is the run's probe set, read by every probe callback (ExtractionProbe,
LikelihoodTracker) that names no ``probe_set`` of its own, so a config writes the probe set and
its window once and one flag swaps it for both.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import Accelerator, CUDAAccelerator, MPSAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import FSDPStrategy

from selftrain.callbacks.epoch_eval import EpochEvaluation
from selftrain.callbacks.probe_eval import SharedProbeSet, share_probe_set
from selftrain.callbacks.run_checkpoint import RunCheckpoint
from selftrain.callbacks.tb_layout import TensorBoardLayout
from selftrain.errors import SelftrainError
from selftrain.training.checkpoint_io import AtomicCheckpointIO
from selftrain.training.checks import ampere_or_newer
from selftrain.training.data import CorpusDataModule
from selftrain.training.fsdp import DecoderLayerFSDP
from selftrain.training.module import StudentLM

DEFAULT_ROOT = "runs/default"


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
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "selftrain"},
            trainer_defaults={"use_distributed_sampler": False,
                              "callbacks": [TensorBoardLayout()]},
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the student's spec into the data; add the checkpoint callback and probe set."""
        parser.link_arguments("model.model", "data.tokenizer")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_class_arguments(SharedProbeSet, "probes", instantiate=False)
        parser.set_defaults({
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 0,
            "checkpoint.every_n_train_steps": 50,
        })

    def before_instantiate_classes(self) -> None:
        """Put the logger and checkpoints under the run dir; share the run's probe set."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        share_probe_set(config.trainer.callbacks, config.get("probes"))
        root = config.trainer.default_root_dir or DEFAULT_ROOT
        config.trainer.default_root_dir = root
        if config.trainer.logger in (None, True):
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(save_dir=root, name="tb", version="",
                                    default_hp_metric=False))
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (the student has nothing to predict)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The Trainer, with atomic local checkpoint writes unless a plugin already sets them."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        _check_gpu_request({**config.get("trainer", {}), **kwargs})
        trainer = super().instantiate_trainer(**kwargs)
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
        """Check the machine, the corpus and every evaluation callback's inputs first."""
        self.check_machine()
        self.datamodule.load()
        for callback in self.trainer.callbacks:
            if isinstance(callback, EpochEvaluation):
                callback.ensure_checked(self.trainer, self.model)

    def before_validate(self) -> None:
        """Evaluation needs a held-out corpus; say so before loading anything."""
        if self.datamodule.hparams.eval_corpus is None:
            raise SelftrainError(f"selftrain {self.subcommand} needs --data.eval_corpus "
                                 "(a held-out corpus dir or file)")
        self.check_machine()
        self.datamodule.load()

    before_test = before_validate


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
    if isinstance(accelerator, Accelerator):
        return isinstance(accelerator, CUDAAccelerator)
    name = str(accelerator or "auto").lower()
    if name == "cuda":
        return True
    return (name in ("gpu", "auto") and not MPSAccelerator.is_available()
            and CUDAAccelerator.is_available())
