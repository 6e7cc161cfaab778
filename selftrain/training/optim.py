"""The student's optimizer and learning-rate schedule.

One place for what :class:`selftrain.training.module.StudentLM` and the bench scripts build:
AdamW parameter groups with weight decay on matrices only, torch's AdamW or a bitsandbytes
variant, and linear warmup followed by a cosine (or constant) schedule, stepped per optimizer
step.
"""

from __future__ import annotations

import math

import torch

from selftrain.training.fsdp import clean_name

BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
                  "paged_adamw": "PagedAdamW"}
"""``--model.optimizer`` choices served by bitsandbytes -> its class name in ``bnb.optim``."""


def param_groups(model: torch.nn.Module, weight_decay: float,
                 matrices: set[str] | None = None) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices only, not on norms or biases.

    Args:
        model: the student (possibly wrapped; wrapper name parts are ignored).
        weight_decay: decay of the matrix group.
        matrices: names of the matrices; None takes the parameters with 2+ dims now (wrong
            once FSDP has flattened them, so the student records them at load time).
    """
    trainable = [(clean_name(name), p) for name, p in model.named_parameters()
                 if p.requires_grad]
    if matrices is None:
        matrices = {name for name, p in trainable if p.ndim >= 2}
    return [{"params": [p for name, p in trainable if name in matrices],
             "weight_decay": weight_decay},
            {"params": [p for name, p in trainable if name not in matrices],
             "weight_decay": 0.0}]


def build_optimizer(name: str, groups: list[dict], lr: float, betas: tuple[float, float],
                    fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer named by ``--model.optimizer`` over parameter groups.

    Args:
        name: ``adamw`` or a :data:`BNB_OPTIMIZERS` key.
        groups: parameter groups (each with its own weight decay).
        lr: peak learning rate.
        betas: Adam betas.
        fused: torch AdamW's fused CUDA kernel (ignored by bitsandbytes).
    """
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
    import bitsandbytes as bnb

    return getattr(bnb.optim, BNB_OPTIMIZERS[name])(groups, lr=lr, betas=betas)


def lr_multiplier(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier at an optimizer step: linear warmup, then cosine or constant.

    Args:
        step: optimizer steps taken so far.
        total: optimizer steps in the whole run.
        warmup: warmup steps.
        schedule: ``cosine`` or ``constant``.
        min_ratio: the cosine floor, as a share of the peak.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int, schedule: str,
                min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_multiplier` as a scheduler, to be stepped once per optimizer step.

    Args:
        optimizer: the optimizer whose learning rate it sets.
        total: optimizer steps in the whole run.
        warmup: warmup steps.
        schedule: ``cosine`` or ``constant``.
        min_ratio: the cosine floor, as a share of the peak.
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total, warmup, schedule, min_ratio))
