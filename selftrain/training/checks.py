"""What a run's settings need from the installation and the machine, checked up front.

A setting the machine cannot run (a GPU accelerator or FSDP without a CUDA GPU, bf16 on a GPU
older than Ampere, flash attention without flash-attn or a CUDA GPU, a bitsandbytes optimizer
on CPU or under FSDP, activation checkpointing asked twice) fails in one line naming the flag
and the fix, before any weights are loaded. ``--model.attn_implementation auto`` is resolved
here too, from the installed packages, the GPU and the precision. Which device an
``--trainer.accelerator`` runs on is decided in one place, :func:`selftrain.precision.device_type`
(precision ``auto`` needs it too).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import FSDPStrategy

from selftrain.errors import SelftrainError
from selftrain.precision import device_type
from selftrain.training.fsdp import DecoderLayerFSDP, is_sharded
from selftrain.training.optim import BNB_OPTIMIZERS


def ampere_or_newer(device: torch.device) -> bool:
    """Whether a CUDA device is Ampere or newer: bf16 natively (not emulated), flash attention."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def available_memory() -> int | None:
    """Bytes of memory the machine can still give; None if unknown.

    Linux's ``MemAvailable``; elsewhere the free pages, or failing that (macOS) the total.
    """
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):  # macOS has only the total
        try:
            return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            continue
    return None


def check_gpu_request(trainer: dict[str, Any]) -> None:
    """Refuse, in one line, a GPU accelerator or FSDP on a machine Lightning would refuse them on.

    Lightning (2.6.6) resolves ``--trainer.accelerator gpu`` (and ``auto``) to MPS where it
    is available, else CUDA (:func:`~selftrain.precision.device_type`), and refuses ``gpu``
    with neither; its string-named ``fsdp`` strategies (and a plain ``FSDPStrategy``) need the
    accelerator to resolve to CUDA. Checked before the Trainer is built.

    Args:
        trainer: the Trainer's arguments (``accelerator``, ``strategy``, ...).
    """
    accelerator, strategy = trainer.get("accelerator", "auto"), trainer.get("strategy", "auto")
    name = accelerator.lower() if isinstance(accelerator, str) else None
    if ((name == "gpu" and device_type(name) == "cpu")
            or (name == "cuda" and not CUDAAccelerator.is_available())):
        raise SelftrainError(f"--trainer.accelerator {accelerator}: this machine has no CUDA GPU "
                             "(FSDP needs one); use --trainer.accelerator cpu, with "
                             "--trainer.strategy ddp for several processes")
    fsdp = (isinstance(strategy, str)
            and strategy.lower() in FSDPStrategy.get_registered_strategies()
            ) or type(strategy) is FSDPStrategy
    if fsdp and device_type(accelerator) != "cuda":
        raise SelftrainError("--trainer.strategy fsdp needs CUDA GPUs; on CPU use "
                             "--trainer.strategy ddp (configs/scale/ddp.yaml)")


def check_trainer(trainer: L.Trainer) -> None:
    """Refuse a strategy or precision the Trainer's machine cannot run, before any weights load.

    Args:
        trainer: the built Trainer.
    """
    strategy = trainer.strategy
    if isinstance(strategy, DecoderLayerFSDP):
        strategy.check_machine()
    device = strategy.root_device
    precision = str(trainer.precision)
    if precision.startswith("bf16") and device.type == "cuda" and not ampere_or_newer(device):
        raise SelftrainError(f"--trainer.precision {precision}: "
                             f"{torch.cuda.get_device_name(device)} has no bf16; use "
                             "16-mixed (or 32-true)")


def flash_attn_installed() -> bool:
    """Whether the flash-attn package can be imported."""
    return importlib.util.find_spec("flash_attn") is not None


def check_installed(attn_implementation: str | None, optimizer: str) -> None:
    """Refuse choices whose package is missing, naming the flag and the fix.

    Args:
        attn_implementation: ``--model.attn_implementation``.
        optimizer: ``--model.optimizer``.
    """
    if attn_implementation == "flash_attention_2" and not flash_attn_installed():
        raise SelftrainError("--model.attn_implementation flash_attention_2: flash-attn is not "
                             "installed (pip install flash-attn --no-build-isolation on a CUDA "
                             "machine); use sdpa, or auto to pick it when present")
    if optimizer in BNB_OPTIMIZERS and importlib.util.find_spec("bitsandbytes") is None:
        raise SelftrainError(f"--model.optimizer {optimizer}: bitsandbytes is not installed "
                             "(pip install bitsandbytes, on a CUDA machine); or use "
                             "--model.optimizer adamw")


def check_machine(trainer: L.Trainer, optimizer: str, attn_implementation: str | None,
                  gradient_checkpointing: bool) -> None:
    """Refuse settings the Trainer's device or strategy cannot run.

    Args:
        trainer: the Trainer that will fit the student.
        optimizer: ``--model.optimizer``.
        attn_implementation: ``--model.attn_implementation``.
        gradient_checkpointing: ``--model.gradient_checkpointing``.
    """
    device = trainer.strategy.root_device.type
    if optimizer != "adamw" and device != "cuda":
        raise SelftrainError(f"--model.optimizer {optimizer} needs a CUDA GPU "
                             "(bitsandbytes keeps its states there); use --model.optimizer "
                             f"adamw on {device}")
    if optimizer != "adamw" and is_sharded(trainer):
        raise SelftrainError(f"--model.optimizer {optimizer}: bitsandbytes' states do "
                             "not go through FSDP's sharded optimizer checkpoints; use "
                             "--model.optimizer adamw with FSDP, or DDP")
    if attn_implementation == "flash_attention_2" and device != "cuda":
        raise SelftrainError("--model.attn_implementation flash_attention_2 needs a CUDA GPU; "
                             f"use sdpa (or auto) on {device}")
    if gradient_checkpointing and getattr(trainer.strategy, "checkpoint_layers", False):
        raise SelftrainError("--model.gradient_checkpointing true and the FSDP strategy's "
                             "activation_checkpointing both recompute the decoder layers; "
                             "set --model.gradient_checkpointing false")


def resolve_attention(choice: str | None, trainer: L.Trainer | None) -> str | None:
    """``--model.attn_implementation`` with ``auto`` resolved.

    ``auto`` is ``flash_attention_2`` where flash-attn is installed and the student trains on
    an Ampere or newer GPU in 16-bit precision, else None (transformers' default).

    Args:
        choice: ``--model.attn_implementation``.
        trainer: the Trainer the student runs under; None resolves ``auto`` to the default.
    """
    if choice != "auto":
        return choice
    if trainer is None or not flash_attn_installed():
        return None
    device = trainer.strategy.root_device
    half = str(trainer.precision).startswith(("bf16", "16"))  # flash runs in 16 bits
    return "flash_attention_2" if half and ampere_or_newer(device) else None
