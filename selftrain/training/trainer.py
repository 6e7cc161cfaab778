"""The Trainer every selftrain command builds: Lightning's, with ``precision: auto``.

Lightning's ``precision`` has no value that means "bf16 where this device computes it natively,
float32 elsewhere", and bf16 autocast on a CPU without bf16 instructions is emulated, about
60 to 80 times slower per matmul. This subclass only widens the flag's type so that
``--trainer.precision auto`` parses, and resolves it
(:func:`selftrain.precision.trainer_precision`).
The CLI resolves it before the config is saved, so a run's ``config.yaml`` records what ran.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch import Trainer

from selftrain.precision import trainer_precision


class SelftrainTrainer(Trainer):
    """Lightning's Trainer; ``precision`` also takes ``auto`` (see the module docstring)."""

    def __init__(self, *, precision: _PRECISION_INPUT | Literal["auto"] | None = "auto",
                 **kwargs: Any) -> None:
        """Build the Trainer with ``precision`` resolved.

        Args:
            precision: ``auto`` (bf16-mixed where the accelerator computes bf16 natively,
                else 32-true), or any Lightning precision (``32-true``, ``bf16-mixed``,
                ``16-mixed``, ...; bf16 on a CPU without native bf16 is warned about).
            kwargs: every other Lightning Trainer argument.
        """
        super().__init__(precision=trainer_precision(precision, kwargs.get("accelerator", "auto")),
                         **kwargs)
