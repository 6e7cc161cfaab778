"""selftrain.decoding.sampler: BosSampler's cached, refilled decoding equals a full forward.

Sample i does not depend on the batch or the order, and finished rows stop costing compute.
"""

import pytest
import torch

from selftrain.decoding.sampler import BosSampler
from selftrain.models import load_model, load_tokenizer, resolve_bos_id


def _model_with_likely_eos(family: str, bias: float = 3.5):
    """A tiny model whose EOS logit is raised, so rows end at staggered lengths and refill."""
    tokenizer = load_tokenizer(f"tiny:{family}")
    model = load_model(f"tiny:{family}").eval()
    eos = tokenizer.eos_token_id

    def raise_eos(module, inputs, logits):
        logits[..., eos] += bias
        return logits

    model.get_output_embeddings().register_forward_hook(raise_eos)
    bos, _ = resolve_bos_id(tokenizer, model.config)
    return model, tokenizer, bos, eos


@pytest.mark.parametrize("family, attention", [
    ("qwen2", "sdpa"), ("llama", "sdpa"), ("gpt_neox", "sdpa"), ("llama", "eager"),
    ("gpt_neox", "eager")])
def test_cached_refilled_decoding_matches_a_full_forward(family, attention):
    model, tokenizer, bos, eos = _model_with_likely_eos(family)
    model.set_attn_implementation(attention)  # eager adds the mask: it must be additive
    vocab = len(tokenizer)
    sampler = BosSampler(model, bos, eos, vocab, temperature=1.0, max_new_tokens=24,
                         batch_size=4, seed=7, record_logprobs=True)
    samples = list(sampler.sample(range(40)))
    lengths = {len(s.tokens) for s in samples}
    assert sorted(s.id for s in samples) == list(range(40))
    assert len(lengths) > 5 and sampler.steps > 24 + 16  # staggered refills and a cache shift
    for s in samples:
        ids = torch.tensor([[bos, *s.tokens]])
        with torch.no_grad():
            reference = torch.log_softmax(model(ids).logits[0, :-1, :vocab].float(), dim=-1)
        expected = reference.gather(-1, ids[0, 1:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(s.logprobs), expected, atol=1e-4), s.id
        assert s.finished == (s.tokens[-1] == eos) and (s.finished or len(s.tokens) == 24)


def test_sample_i_is_the_same_whatever_the_batch_and_the_order():
    model, tokenizer, bos, eos = _model_with_likely_eos("llama")
    args = (model, bos, eos, len(tokenizer))
    kwargs = {"temperature": 1.0, "max_new_tokens": 16, "seed": 3}
    one = {s.id: s.tokens for s in BosSampler(*args, batch_size=16, **kwargs).sample(range(30))}
    two = {s.id: s.tokens for s in BosSampler(*args, batch_size=3, **kwargs).sample(
        reversed(range(30)))}
    other_seed = {s.id: s.tokens for s in BosSampler(
        *args, batch_size=3, **{**kwargs, "seed": 4}).sample(range(30))}
    assert one == two
    assert sum(one[i] != other_seed[i] for i in range(30)) > 25


def test_finished_rows_stop_costing_compute():
    model, tokenizer, bos, eos = _model_with_likely_eos("qwen2")
    sampler = BosSampler(model, bos, eos, len(tokenizer), temperature=1.0, max_new_tokens=32,
                         batch_size=16, seed=0)
    tokens = sum(len(s.tokens) for s in sampler.sample(range(64)))
    # plain batched decoding computes every row until the batch's longest row ends
    assert sampler.rows_computed < 1.5 * tokens < 64 * 32
