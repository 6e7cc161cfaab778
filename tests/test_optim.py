"""selftrain.training.optim: the student's AdamW parameter groups."""

import torch

from selftrain.models import load_model
from selftrain.training.optim import build_optimizer


def test_adamw_keeps_decay_off_norms_and_biases():
    model = load_model("tiny:qwen2")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = build_optimizer("adamw", [{"params": decay, "weight_decay": 0.1},
                                          {"params": rest, "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.95))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
