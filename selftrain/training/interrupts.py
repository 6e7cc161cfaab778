"""Ctrl-C during ``fit``, ``validate`` or ``test``: one line saying what was kept, status 130.

Lightning (2.6.6) shuts down gracefully on Ctrl-C (``trainer.interrupted`` is set, callbacks'
``on_exception`` run) and then exits with status 1. :func:`run_interruptible` turns that exit
into :class:`~selftrain.errors.Interrupted`, whose message the CLI prints as one line before it
exits with status 130.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from selftrain.errors import Interrupted
from selftrain.training.run_dir import find_last_checkpoint, read_checkpoint_meta

NOTHING_KEPT = "interrupted; it wrote nothing to keep: rerun the command"
"""What an interrupted validate or test says."""


def run_interruptible(trainer: L.Trainer, entry: Callable[..., Any], kwargs: dict[str, Any],
                      message: Callable[[], str]) -> None:
    """Run a Trainer entry point; on Ctrl-C raise :class:`Interrupted` with ``message()``.

    Args:
        trainer: the Trainer ``entry`` belongs to (it says whether Ctrl-C ended the run).
        entry: ``trainer.fit``, ``trainer.validate`` or ``trainer.test``.
        kwargs: its arguments.
        message: what was kept, asked for only once the run was interrupted.
    """
    try:
        entry(**kwargs)
    except SystemExit:
        if not trainer.interrupted:
            raise
        raise Interrupted(message()) from None


def fit_interrupted(step: int, checkpoint_dir: Path) -> str:
    """What an interrupted fit kept: the step reached and the last checkpoint's.

    Args:
        step: the global step the fit reached.
        checkpoint_dir: the run's checkpoint dir.
    """
    found = find_last_checkpoint(checkpoint_dir)
    saved = (f"the last checkpoint is at step {read_checkpoint_meta(found)['global_step']}"
             if found is not None else "no checkpoint was written yet")
    return (f"interrupted at step {step}; {saved}: rerun the same command with --ckpt_path "
            "last to resume")
