"""selftrain.training.optim: the student's AdamW, its parameter groups and its schedule's input.

The groups are the real student's, as ``StudentLM.configure_optimizers`` builds them under a
real Trainer: weight decay on every matrix (linear and embedding weights), none on norm weights
and biases, each parameter once. The flattened case (FSDP shards, where every parameter is 1-D)
is checked on 2 CPU ranks in ``tests/test_fsdp.py`` (slow), against the same rule.
"""

import pytest
import torch
from helpers import fit_cli
from torch import nn


def expected_groups(model: nn.Module) -> tuple[set[str], set[str]]:
    """(matrices, norms and biases) of a transformers model, by the kind of module they are in.

    Decided from the modules (``nn.Linear`` / ``nn.Embedding`` weights; weights of modules whose
    class is a norm; any ``bias``), not from the parameters' shapes, which is how the student
    decides; every parameter must be one or the other. Names as ``named_parameters`` gives them
    (a tied weight under its first name).
    """
    canonical = {id(p): name for name, p in model.named_parameters()}
    matrices, rest = set(), set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "bias" or (name == "weight" and "norm" in type(module).__name__.lower()):
                rest.add(canonical[id(param)])
            elif name == "weight" and isinstance(module, (nn.Linear, nn.Embedding)):
                matrices.add(canonical[id(param)])
            else:
                raise AssertionError(f"{canonical[id(param)]} of {type(module).__name__}: "
                                     "neither kind")
    assert not matrices & rest
    return matrices, rest


@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt_neox"])
def test_adamw_decays_the_real_students_matrices_only(tmp_path, family):
    built = fit_cli(tmp_path / "run", "--model.model", f"tiny:{family}", "--model.weight_decay",
                    "0.1", "--model.betas", "[0.8, 0.9]", "--trainer.max_steps", "1",
                    callbacks=False, export=False)
    optimizer = built.trainer.optimizers[0]  # what Lightning stepped
    assert type(optimizer) is torch.optim.AdamW
    assert not optimizer.defaults["fused"]  # fused is for CUDA only
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["betas"] == no_decay["betas"] == (0.8, 0.9)

    student = built.model.model
    names = {id(p): name for name, p in student.named_parameters()}  # tied ones listed once
    grouped = [[names[id(p)] for p in group["params"]] for group in (decay, no_decay)]
    everything = grouped[0] + grouped[1]
    assert len(everything) == len(set(everything)) == len(names)  # each parameter once
    matrices, norms_and_biases = expected_groups(student)
    assert set(grouped[0]) == matrices
    assert set(grouped[1]) == norms_and_biases
    assert any("norm" in n for n in norms_and_biases) and any("embed" in n for n in matrices)
    if family in ("qwen2", "gpt_neox"):  # attention biases (and LayerNorm's, gpt_neox)
        assert any(n.endswith(".bias") for n in norms_and_biases)
