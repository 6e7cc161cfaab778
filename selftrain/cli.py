"""The `selftrain` command: LightningCLI for training, plus the corpus tools as subcommands.

``selftrain fit|validate|test --config X.yaml`` is LightningCLI over :class:`StudentLM` and
:class:`CorpusDataModule`. Every other subcommand (``generate``, ...) is a typed function
turned into a parser by jsonargparse, so each has ``--help`` and takes ``--config`` as well as
flags. This module only builds the CLI; the work lives in the modules it calls.

Run layout: everything of a run goes under ``--trainer.default_root_dir`` (``runs/default``
unless set): ``tb/`` (TensorBoard events and the resolved ``config.yaml``), ``checkpoints/``
(``last.ckpt`` plus periodic ones) and ``hf/epoch=N`` (HF exports). Resume a killed run with
the same command plus ``--ckpt_path last``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable

from jsonargparse import CLI, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.run_checkpoint import RunCheckpoint
from selftrain.data import CorpusDataModule
from selftrain.errors import SelftrainError
from selftrain.module import StudentLM

DEFAULT_ROOT = "runs/default"

TOOLS: dict[str, tuple[str, str, str]] = {
    "generate": ("selftrain.generate", "generate", "sample a corpus from a model's BOS token"),
}
"""subcommand -> (module, function, one-line summary); imported only when used."""

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


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
            trainer_defaults={"use_distributed_sampler": False},
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the student's spec into the data and add the checkpoint callback."""
        parser.link_arguments("model.model", "data.tokenizer")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 0,
            "checkpoint.every_n_train_steps": 50,
        })

    def before_instantiate_classes(self) -> None:
        """Put the TensorBoard logger and checkpoints under the run dir unless configured."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or DEFAULT_ROOT
        config.trainer.default_root_dir = root
        if config.trainer.logger in (None, True):
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(save_dir=root, name="tb", version="",
                                    default_hp_metric=False))
        if "checkpoint" in config and config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")


    def before_fit(self) -> None:
        """Check the corpus against the student's tokenizer before anything is written."""
        self.datamodule.load()

    before_validate = before_test = before_predict = before_fit


def run_tool(name: str, argv: list[str]) -> object:
    """Run a non-training subcommand through jsonargparse (``--help`` and ``--config`` free).

    Args:
        name: a :data:`TOOLS` key.
        argv: its arguments.
    """
    module, function, _ = TOOLS[name]
    target: Callable = getattr(importlib.import_module(module), function)
    return CLI(target, args=argv, prog=f"selftrain {name}", as_positional=False)


def print_help() -> None:
    """Top-level help: the trainer subcommands and the tools."""
    lines = ["usage: selftrain <command> [--config FILE] [flags]", "",
             "training (LightningCLI; `selftrain fit --help` lists every flag):"]
    lines += [f"  {command:<10} {command} the student (StudentLM + CorpusDataModule)"
              for command in TRAINER_COMMANDS]
    lines += ["", "corpus tools (`selftrain <tool> --help`):"]
    lines += [f"  {name:<10} {summary}" for name, (_, _, summary) in TOOLS.items()]
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``selftrain`` console script and ``python -m selftrain``.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.
    """
    argv_from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print_help()
        elif argv[0] in TOOLS:
            run_tool(argv[0], argv[1:])
        else:
            SelftrainCLI(args=None if argv_from_sys else argv)
    except SelftrainError as error:
        print(f"selftrain: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
