"""Trainer and checkpoint flags checked before anything is built or written.

Lightning accepts some values it cannot run (``--trainer.devices 0``) or silently treats
as something else; ``selftrain fit|validate|test`` refuses them here first, in one line.
"""

from __future__ import annotations

from typing import Any


def check_trainer_flags(trainer: Any, checkpoint: Any) -> None:
    """Refuse trainer and checkpoint flags this project cannot run, in one line each.

    Args:
        trainer: the parsed ``--trainer.*`` namespace.
        checkpoint: the parsed ``--checkpoint.*`` namespace (None under validate/test).
    """
