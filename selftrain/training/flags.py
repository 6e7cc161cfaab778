"""Trainer and checkpoint flags checked before anything is built or written.

Lightning accepts some values it cannot run (``--trainer.devices 0``) or silently treats
as something else (``--trainer.max_epochs -1`` trains for ever, a negative
``--trainer.gradient_clip_val`` turns the gradient around); others it refuses only with a
traceback, some after the run dir is made. ``selftrain fit|validate|test`` refuses them here
first, in one line each naming the flag. The rules are Lightning 2.6's own limits, plus what
this project cannot use (a run that trains nothing or never ends).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from selftrain.errors import SelftrainError, refuse_first_failed
from selftrain.inputs import check_seed
from selftrain.precision import device_type

SEED_EVERYTHING_MAX = 2**32 - 1
"""Lightning's ``seed_everything`` takes 0..2**32-1 (numpy's global seed) and raises past it."""


def _count(low: int) -> Callable[[Any], bool]:
    """An integer >= ``low``."""
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= low


def _count_or_share(low: int) -> Callable[[Any], bool]:
    """An integer >= ``low`` (batches), or a float share in (0, 1] (``low`` 0: [0, 1])."""
    def check(value: Any) -> bool:
        if isinstance(value, float):
            return (0 <= value if low == 0 else 0 < value) and value <= 1
        return _count(low)(value)
    return check


EVALUATE_ONLY = ("to evaluate a model without training use `selftrain evaluate --model SPEC "
                 "--fit_config CONFIG --out DIR`")
"""What a limit of 0 steps or epochs is refused with: the command that evaluates untrained."""

TRAINER_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("num_nodes", _count(1), "must be >= 1"),
    ("max_steps", lambda v: v == -1 or _count(1)(v),
     "must be >= 1, or -1 for no step limit (0 trains nothing; " + EVALUATE_ONLY + ")"),
    ("min_epochs", _count(0), "must be >= 0"),
    ("min_steps", _count(0), "must be >= 0"),
    ("accumulate_grad_batches", _count(1), "must be >= 1 (1 accumulates nothing)"),
    ("val_check_interval", _count_or_share(1),
     "must be a number of batches >= 1, or a share of the epoch in (0, 1]"),
    ("check_val_every_n_epoch", _count(1), "must be >= 1, or null to validate by steps only"),
    ("limit_train_batches", _count_or_share(0), "must be a number of batches >= 0 or a share "
                                                "in [0, 1]"),
    ("limit_val_batches", _count_or_share(0), "must be a number of batches >= 0 or a share "
                                              "in [0, 1]"),
    ("limit_test_batches", _count_or_share(0), "must be a number of batches >= 0 or a share "
                                               "in [0, 1]"),
    ("log_every_n_steps", _count(1), "must be >= 1"),
    ("gradient_clip_val", lambda v: isinstance(v, (int, float)) and v >= 0,
     "must be >= 0 (0 does not clip; a negative value would turn the gradient around)"),
    ("num_sanity_val_steps", lambda v: v == -1 or _count(0)(v),
     "must be >= 0, or -1 for every validation batch"),
]
"""(``--trainer.*`` field, rule, what the rule says); None (unset) always passes."""

CHECKPOINT_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("every_n_train_steps", _count(0), "must be >= 0 (0: no mid-epoch checkpoints)"),
    ("every_n_epochs", _count(0), "must be >= 0"),
    ("save_top_k", lambda v: v == -1 or _count(0)(v), "must be >= 0, or -1 to keep every one"),
]
"""(``--checkpoint.*`` field, rule, what the rule says); None (unset) always passes."""


def check_trainer_flags(trainer: Any, checkpoint: Any) -> None:
    """Refuse trainer and checkpoint flags this project cannot run, in one line each.

    Args:
        trainer: the parsed ``--trainer.*`` namespace.
        checkpoint: the parsed ``--checkpoint.*`` namespace (None under validate/test).
    """
    _check_rules(trainer, "trainer", TRAINER_RULES)
    _check_devices(trainer.get("devices"), _runs_on_cpu(trainer.get("accelerator")))
    _check_epochs(trainer.get("max_epochs"), trainer.get("max_steps"))
    if checkpoint is not None:
        _check_rules(checkpoint, "checkpoint", CHECKPOINT_RULES)
        _check_checkpoint_triggers(checkpoint)


def check_seed_everything(seed: Any) -> None:
    """Refuse a ``--seed_everything`` Lightning's ``seed_everything`` would raise on.

    Args:
        seed: true (a random seed), false (no seeding) or an integer.
    """
    if not isinstance(seed, bool) and seed is not None:
        check_seed(seed, "--seed_everything", maximum=SEED_EVERYTHING_MAX)


def _check_rules(namespace: Any, group: str,
                 rules: list[tuple[str, Callable[[Any], bool], str]]) -> None:
    """Apply ``rules`` to the fields of one parsed group (``trainer``, ``checkpoint``)."""
    fields = [(name, namespace.get(name), ok, rule) for name, ok, rule in rules]
    refuse_first_failed((value is None or ok(value), f"--{group}.{name} {value}: {rule}")
                        for name, value, ok, rule in fields)


def _check_devices(devices: Any, on_cpu: bool) -> None:
    """``--trainer.devices``: auto, a count >= 1, -1 (all), or device indices (a list, "0,1").

    Args:
        devices: the parsed value.
        on_cpu: the accelerator is the CPU, where only a count of processes (or auto) runs.
    """
    if devices is None or devices == "auto":
        return
    count = (int(devices) if isinstance(devices, str) and devices.strip().isdigit()
             else devices if isinstance(devices, int) and not isinstance(devices, bool)
             else None)
    if on_cpu and not (count is not None and count >= 1):
        raise SelftrainError(f"--trainer.devices {devices}: on the CPU give a number of "
                             "processes >= 1 (or auto); -1 and device indices are for GPUs")
    if not _devices_ok(devices):
        raise SelftrainError(f"--trainer.devices {devices}: give a count >= 1 (per node), -1 "
                             "for all, auto, or device indices such as [0, 1]")


def _runs_on_cpu(accelerator: Any) -> bool:
    """Whether ``--trainer.accelerator`` is the CPU: ``cpu``, or ``auto`` without a GPU.

    ``gpu`` without a GPU is not: :func:`selftrain.training.checks.check_gpu_request` refuses
    it. An Accelerator object or a class path is left to Lightning.
    """
    return (isinstance(accelerator, str) and accelerator.lower() in ("cpu", "auto")
            and device_type(accelerator) == "cpu")


def _devices_ok(devices: Any) -> bool:
    """Whether a ``--trainer.devices`` value other than auto is one Lightning can run."""
    if isinstance(devices, str):
        parts = [part.strip() for part in devices.split(",")]
        if len(parts) > 1:  # "0,1" or "1,": device indices
            return any(parts) and all(part.isdigit() for part in parts if part)
        try:
            devices = int(parts[0])
        except ValueError:
            return False
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices >= 1 or devices == -1
    return (isinstance(devices, (list, tuple)) and len(devices) > 0
            and all(_count(0)(index) for index in devices))


def _check_epochs(max_epochs: int | None, max_steps: int | None) -> None:
    """``--trainer.max_epochs``: >= 1, or -1 (no limit) only with a step limit."""
    if max_epochs is None or max_epochs >= 1:
        return
    steps_limited = max_steps is not None and max_steps >= 1
    if max_epochs == -1 and not steps_limited:
        raise SelftrainError("--trainer.max_epochs -1: trains for ever without a step limit; "
                             "also set --trainer.max_steps N, or give a number of epochs")
    if max_epochs < -1 or max_epochs == 0:
        raise SelftrainError(f"--trainer.max_epochs {max_epochs}: must be >= 1, or -1 with "
                             f"--trainer.max_steps N (0 trains nothing; {EVALUATE_ONLY})")


def _check_checkpoint_triggers(checkpoint: Any) -> None:
    """Lightning's ModelCheckpoint saves on one trigger: steps, epochs or a time interval."""
    triggers = [flag for flag, on in (
        ("every_n_train_steps", (checkpoint.get("every_n_train_steps") or 0) >= 1),
        ("every_n_epochs", (checkpoint.get("every_n_epochs") or 0) >= 1),
        ("train_time_interval", checkpoint.get("train_time_interval") is not None),
    ) if on]
    if len(triggers) > 1:
        first, second = triggers[:2]
        raise SelftrainError(f"--checkpoint.{second} {checkpoint.get(second)}: checkpoints "
                             f"are saved on one trigger and --checkpoint.{first} is "
                             f"{checkpoint.get(first)} too; pass --checkpoint.{first} "
                             f"{'null' if first == 'train_time_interval' else 0} (last.ckpt "
                             "is refreshed at every epoch end anyway)")
