"""selftrain.training.module: StudentLM's options train; regional compile changes no number."""

import pytest
import torch
from helpers import fit, make_student

from selftrain.analysis.tb import read_scalars


@pytest.mark.parametrize("flags", [
    ["--model.gradient_checkpointing", "true", "--model.attn_implementation", "eager"],
    ["--model.schedule", "constant", "--model.warmup_ratio", "0"],
])
def test_student_options_train(run_dir, flags):
    fit(run_dir, "--trainer.max_epochs", "1", "--model.export_hf", "never", *flags)
    scalars = read_scalars(run_dir / "tb")
    assert len(scalars["train/loss"]) == 24
    if "constant" in flags:
        assert {round(v, 8) for _, v in scalars["train/lr"]} == {3e-3}


@pytest.mark.slow
def test_compile_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (4, 32))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    results = []
    for compiled in (False, True):
        module = make_student(compile=compiled)
        layers = module.model.model.layers
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
        loss = module._loss(batch)
        loss.backward()
        results.append((loss.detach(), layers[0].mlp.up_proj.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
