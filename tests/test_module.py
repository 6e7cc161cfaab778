"""selftrain.training.module: StudentLM's options train, and change no number they should not.

Gradient checkpointing and eager attention reach the loaded student and train to the default
(SDPA, no checkpointing) run's losses and weights; the constant schedule holds the LR; regional
compile gives the same loss and gradients (slow).
"""

import pytest
import torch
from helpers import fit, fit_cli, make_student

from selftrain.analysis.tb import read_scalars

EPOCH = ("--trainer.max_epochs", "1")


def losses(run):
    """The run's ``train/loss`` values, one per step."""
    return [v for _, v in read_scalars(run / "tb")["train/loss"]]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One epoch of the debug config with the defaults: SDPA, no checkpointing."""
    run = tmp_path_factory.mktemp("module") / "default"
    built = fit_cli(run, *EPOCH, callbacks=False, export=False)
    assert built.model.model.config._attn_implementation == "sdpa"
    assert not built.model.model.is_gradient_checkpointing
    return losses(run), built.model.model.state_dict()


@pytest.mark.parametrize("checkpointing, attention", [(True, "sdpa"), (False, "eager"),
                                                      (True, "eager")])
def test_checkpointing_and_eager_attention_train_as_the_default(tmp_path, default_run,
                                                               checkpointing, attention):
    built = fit_cli(tmp_path / "run", *EPOCH, "--model.gradient_checkpointing",
                    str(checkpointing).lower(), "--model.attn_implementation", attention,
                    callbacks=False, export=False)
    student = built.model.model
    assert student.config._attn_implementation == attention
    assert student.is_gradient_checkpointing is checkpointing
    expected_losses, expected_weights = default_run
    ours = losses(tmp_path / "run")
    assert len(ours) == len(expected_losses) == 24
    weights = student.state_dict()
    if attention == "sdpa":
        # checkpointing recomputes each layer's forward in backward: the same kernels on the
        # same inputs, so every loss and weight is the default run's to the bit
        assert ours == expected_losses
        for name, tensor in weights.items():
            torch.testing.assert_close(tensor, expected_weights[name], rtol=0, atol=0, msg=name)
    else:
        # eager and SDPA compute the same softmax attention with other kernels: float32
        # rounding apart (measured: losses within 1e-6, i.e. an ulp at ~5.5; weights within
        # 1e-5 after 24 Adam steps at lr 3e-3). A wrong mask or scale moves losses by >1e-2.
        assert ours[0] == pytest.approx(expected_losses[0], rel=1e-6)
        assert ours == pytest.approx(expected_losses, rel=1e-5)
        for name, tensor in weights.items():
            torch.testing.assert_close(tensor, expected_weights[name], rtol=0, atol=1e-4,
                                       msg=name)


def test_constant_schedule_holds_the_lr(run_dir):
    fit(run_dir, *EPOCH, "--model.export_hf", "never", "--model.schedule", "constant",
        "--model.warmup_ratio", "0", callbacks=False)
    scalars = read_scalars(run_dir / "tb")
    assert len(scalars["train/loss"]) == 24
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
