"""selftrain.training.interrupts: Ctrl-C during a Trainer entry point ends in one line.

Lightning exits with status 1 after its graceful shutdown; an interrupted Trainer's exit becomes
:class:`Interrupted` with what was kept, any other exit passes through. End to end (a real
SIGINT, status 130) in test_cli.py.
"""

import sys
from types import SimpleNamespace

import pytest
import torch

from selftrain.errors import Interrupted
from selftrain.training.interrupts import fit_interrupted, run_interruptible


def exits(**kwargs) -> None:
    """A Trainer entry point that ends as Lightning's does after Ctrl-C."""
    sys.exit(1)


def test_an_interrupted_trainer_ends_in_interrupted_with_what_was_kept():
    with pytest.raises(Interrupted, match="^kept$"):
        run_interruptible(SimpleNamespace(interrupted=True), exits, {}, lambda: "kept")
    with pytest.raises(SystemExit):  # an exit that was no Ctrl-C is left alone
        run_interruptible(SimpleNamespace(interrupted=False), exits, {}, lambda: "kept")


def test_an_interrupted_fit_names_the_step_of_its_last_checkpoint(tmp_path):
    assert fit_interrupted(3, tmp_path).startswith(
        "interrupted at step 3; no checkpoint was written yet: rerun")
    torch.save({"global_step": 10}, tmp_path / "last.ckpt")
    assert fit_interrupted(15, tmp_path) == (
        "interrupted at step 15; the last checkpoint is at step 10: rerun the same command "
        "with --ckpt_path last to resume")
