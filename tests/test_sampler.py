import numpy as np
import pytest
import torch

from selftrain.errors import SelftrainError
from selftrain.models import load_model, load_tokenizer, resolve_bos_id
from selftrain.sampling.sampler import BosSampler, draw_tokens, sample_uniforms


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


def test_uniforms_are_a_pure_function_of_seed_id_and_step():
    ids, steps = np.arange(1000), np.arange(1000) % 7
    u = sample_uniforms(5, ids, steps)
    assert np.array_equal(u, sample_uniforms(5, ids, steps))
    assert np.array_equal(u[10:20], sample_uniforms(5, ids[10:20], steps[10:20]))
    assert not np.array_equal(u, sample_uniforms(6, ids, steps))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.03


def test_draws_follow_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    n = 40_000
    uniforms = torch.from_numpy(sample_uniforms(0, np.arange(n), np.zeros(n, dtype=np.int64)))
    for temperature in (0.5, 1.0, 1.5):
        tokens, logprobs = draw_tokens(logits.expand(n, -1), uniforms, temperature)
        expected = torch.softmax(logits / temperature, dim=-1)
        observed = torch.bincount(tokens, minlength=5).double() / n
        assert torch.allclose(observed, expected.double(), atol=0.01), temperature
        assert torch.allclose(logprobs, expected.log().double()[tokens], atol=1e-6)


def test_top_k_and_top_p_truncate_then_renormalize():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    n = 20_000
    uniforms = torch.from_numpy(sample_uniforms(1, np.arange(n), np.zeros(n, dtype=np.int64)))
    probs = torch.softmax(logits, dim=-1).double()
    tokens, _ = draw_tokens(logits.expand(n, -1), uniforms, 1.0, top_k=2)
    observed = torch.bincount(tokens, minlength=5).double() / n
    assert set(tokens.tolist()) == {0, 1}
    assert torch.allclose(observed[:2], probs[:2] / probs[:2].sum(), atol=0.01)
    # the smallest top set whose mass reaches 0.9: tokens 0, 1, 2 (0.636 + 0.234 < 0.9)
    tokens, _ = draw_tokens(logits.expand(n, -1), uniforms, 1.0, top_p=0.9)
    assert set(tokens.tolist()) == {0, 1, 2}
    # as in transformers: top-p applies to the renormalized top-k distribution
    four = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    tokens, _ = draw_tokens(four.expand(n, -1), uniforms, 1.0, top_k=2, top_p=0.5)
    assert set(tokens.tolist()) == {0}


@pytest.mark.parametrize("top_k", [0, 3])
def test_non_finite_logits_are_a_clear_error_not_a_padded_id(top_k):
    logits = torch.zeros(2, 300)
    logits[1, 5] = float("inf")
    uniforms = torch.tensor([0.3, 0.7], dtype=torch.float64)
    with pytest.raises(SelftrainError, match="not finite.*--dtype"):
        draw_tokens(logits, uniforms, 1.0, top_k=top_k)
    logits[1, 5] = float("nan")
    with pytest.raises(SelftrainError, match="not finite"):
        draw_tokens(logits, uniforms, 1.0, top_k=top_k)
