"""selftrain.training.packing: packed batches give the padded batches' loss, logits, gradients.

On every tiny family and attention, the rule for which students support packing, and in a fit:
the same losses as padding, and a fallback to padding where the student is not supported.
"""

import pytest
import torch
from helpers import DEBUG_CORPUS, fit

from selftrain.analysis.tb import read_scalars
from selftrain.models import load_model
from selftrain.tiny import TINY_FAMILIES
from selftrain.training import packing
from selftrain.training.batching import pad_collate, real_tokens
from selftrain.training.packing import pack_collate, packing_support, packing_supported

LENGTHS = [17, 5, 30, 2, 11]


def random_rows(lengths=LENGTHS, seed=0, vocab=250):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (n,), generator=generator).tolist()}
            for n in lengths]


def run(model, batch):
    return model(**batch, use_cache=False)  # as StudentLM calls it: no KV cache while training


def test_pack_collate_layout():
    rows = random_rows()
    batch = pack_collate(rows)
    total = sum(LENGTHS)
    assert set(batch) == {"input_ids", "position_ids", "labels"}  # no attention_mask
    assert all(tensor.shape == (1, total) for tensor in batch.values())
    assert batch["input_ids"][0].tolist() == [t for row in rows for t in row["input_ids"]]
    assert batch["position_ids"][0].tolist() == [p for n in LENGTHS for p in range(n)]
    starts = {sum(LENGTHS[:i]) for i in range(len(LENGTHS))}
    for i, (token, label) in enumerate(zip(batch["input_ids"][0].tolist(),
                                           batch["labels"][0].tolist(), strict=True)):
        assert label == (-100 if i in starts else token), i
    # the module's token count and eval weight agree with the padded batch's
    padded = pad_collate(rows, pad_id=0)
    assert real_tokens(batch).item() == real_tokens(padded).item() == total
    targets = total - len(LENGTHS)
    assert (batch["labels"][:, 1:] != -100).sum() == (padded["labels"][:, 1:] != -100).sum() \
        == targets


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_packed_loss_and_logits_equal_padded(family, implementation):
    model = load_model(f"tiny:{family}", attn_implementation=implementation)
    assert packing_supported(model)
    rows = random_rows()
    packed, padded = pack_collate(rows), pad_collate(rows, pad_id=0)
    with torch.no_grad():
        packed_out, padded_out = run(model, packed), run(model, padded)
        torch.testing.assert_close(packed_out.loss, padded_out.loss, rtol=1e-5, atol=1e-5)
        start = 0
        for i, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits
            n = len(row["input_ids"])
            torch.testing.assert_close(packed_out.logits[0, start:start + n], alone[0],
                                       rtol=1e-5, atol=1e-5, msg=f"document {i}")
            start += n


def test_packed_gradients_equal_padded():
    model = load_model("tiny:llama", attn_implementation="sdpa").train()
    rows = random_rows(seed=1)
    grads = []
    for batch in (pack_collate(rows), pad_collate(rows, pad_id=0)):
        model.zero_grad()
        run(model, batch).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    packed, padded = grads
    assert packed.keys() == padded.keys()
    for name in packed:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=1e-6, msg=name)


class OwnMaskLM(torch.nn.Module):
    """A causal LM whose module builds its own masks (no transformers create_causal_mask)."""

    def __init__(self, implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": implementation})()


def test_packing_supported_rule():
    for family in TINY_FAMILIES:
        model = load_model(f"tiny:{family}")
        supported, reason = packing_support(model)
        assert supported and "masking_utils" in reason, (family, reason)
        wrapped = type(f"Wrapped{type(model).__name__}", (type(model),), {})  # e.g. FSDP's
        model.__class__ = wrapped
        assert packing_supported(model)
    assert not packing_supported(OwnMaskLM())
    assert "create_causal_mask" in packing_support(OwnMaskLM())[1]
    assert not packing_supported(OwnMaskLM("flash_attention_2"))
    model = load_model("tiny:qwen2")
    model.config._attn_implementation = "my_custom_attention"
    supported, reason = packing_support(model)
    assert not supported and "my_custom_attention" in reason


def fit_one_epoch(run_dir, *flags):
    """One epoch of the debug config, no evaluation callbacks, validated; its scalars."""
    fit(run_dir, "--trainer.max_epochs", "1", "--model.export_hf", "never",
        "--data.eval_corpus", DEBUG_CORPUS, *flags, callbacks=False)
    return read_scalars(run_dir / "tb")


@pytest.fixture(scope="module")
def padded_run(tmp_path_factory):
    return fit_one_epoch(tmp_path_factory.mktemp("padded") / "run")


def losses(scalars):
    return [value for _, value in scalars["train/loss"]]


def test_fit_with_packing_matches_padded(tmp_path, padded_run):
    packed_run = fit_one_epoch(tmp_path / "run", "--data.packing", "true")
    packed, padded = losses(packed_run), losses(padded_run)
    assert len(packed) == len(padded) == 24
    # same batches, same targets: only float summation order differs (measured: <= 2e-7 rel)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=0)
    assert {value for _, value in packed_run["train/real_token_fraction"]} == {1.0}
    assert min(value for _, value in padded_run["train/real_token_fraction"]) < 1.0
    (_, packed_val), = packed_run["val/loss"]
    (_, padded_val), = padded_run["val/loss"]
    assert packed_val == pytest.approx(padded_val, rel=1e-5)


def test_unsupported_student_falls_back_to_padding(tmp_path, padded_run, monkeypatch):
    calls = []

    def unsupported(model):
        calls.append(type(model).__name__)
        return False, "no masking_utils here"

    monkeypatch.setattr("selftrain.training.data.packing_support", unsupported)
    with pytest.warns(UserWarning, match="no masking_utils here; padding each batch") as caught:
        fallback = fit_one_epoch(tmp_path / "run", "--data.packing", "true")
    assert calls == ["Qwen2ForCausalLM"]  # checked once, for train and val loaders alike
    assert len([w for w in caught if "padding each batch" in str(w.message)]) == 1
    assert losses(fallback) == losses(padded_run)  # exactly the padded run
    assert fallback["train/real_token_fraction"] == padded_run["train/real_token_fraction"]
    assert packing.packing_support is not unsupported  # only the data module's view patched
