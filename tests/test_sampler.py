"""selftrain.decoding.sampler: BosSampler's cached, refilled decoding equals a full forward.

Sample i does not depend on the batch, the order, how often the host looks at the batch or
whether shapes are static; the host reads the device once per ``host_every`` steps; finished
rows stop costing compute.
"""

import numpy as np
import pytest
import torch

from selftrain.decoding.draw import NOT_FINITE
from selftrain.decoding.sampler import BosSampler
from selftrain.errors import SelftrainError
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


def _samples(sampler: BosSampler, count: int) -> dict[int, tuple[list[int], bool, list[float]]]:
    """id -> (tokens, finished, log-probabilities) of ``count`` samples."""
    return {s.id: (s.tokens, s.finished, s.logprobs) for s in sampler.sample(range(count))}


@pytest.mark.parametrize("family", ["qwen2", pytest.param("llama", marks=pytest.mark.slow),
                                    pytest.param("gpt_neox", marks=pytest.mark.slow)])
def test_samples_are_the_same_for_every_host_interval_batch_and_static_shapes(family):
    model, tokenizer, bos, eos = _model_with_likely_eos(family, bias=1.0)
    args = (model, bos, eos, len(tokenizer))
    kwargs = {"temperature": 1.0, "max_new_tokens": 32, "seed": 11, "record_logprobs": True}
    reference = _samples(BosSampler(*args, batch_size=8, host_every=1, **kwargs), 40)
    lengths = [len(tokens) for tokens, _, _ in reference.values()]
    assert 0 < sum(finished for _, finished, _ in reference.values()) < 40  # EOS and the cap
    assert len(set(lengths)) >= 8
    for every, batch, static in [(3, 8, False), (8, 5, False), (16, 16, True)]:
        sampler = BosSampler(*args, batch_size=batch, host_every=every, static_shapes=static,
                             **kwargs)
        samples = _samples(sampler, 40)
        assert samples.keys() == reference.keys()
        for i, (tokens, finished, logprobs) in samples.items():
            assert (tokens, finished) == reference[i][:2], (every, batch, static, i)
            # rows start at other cache columns, so attention sums other spans of masked
            # zeros: float32 rounding, as between batch sizes before
            np.testing.assert_allclose(logprobs, reference[i][2], rtol=0, atol=1e-6)
        assert sampler.host_reads * every == sampler.steps  # one read per host_every steps
        if static:
            assert sampler.rows_computed == batch * sampler.steps  # no row ever dropped


def test_the_host_reads_the_device_once_every_host_every_steps():
    model, tokenizer, bos, eos = _model_with_likely_eos("qwen2")
    reads = {}
    for every in (1, 8):
        sampler = BosSampler(model, bos, eos, len(tokenizer), temperature=1.0,
                             max_new_tokens=32, batch_size=16, seed=0, host_every=every)
        tokens = sum(len(s.tokens) for s in sampler.sample(range(64)))
        reads[every] = sampler.host_reads / tokens
        assert sampler.host_reads == sampler.steps // every
    assert reads[1] / reads[8] > 6  # ~8x fewer reads per token; a few wasted steps at the end


def test_a_non_finite_draw_between_two_reads_still_stops_in_one_line():
    model, tokenizer, bos, eos = _model_with_likely_eos("llama")
    calls = []

    def poison_later(module, inputs, logits):
        calls.append(1)
        return logits.fill_(float("nan")) if len(calls) > 2 else logits

    model.get_output_embeddings().register_forward_hook(poison_later)
    sampler = BosSampler(model, bos, eos, len(tokenizer), temperature=1.0, max_new_tokens=32,
                         batch_size=4, seed=0, host_every=4)
    with pytest.raises(SelftrainError, match="not finite") as raised:
        list(sampler.sample(range(8)))
    assert str(raised.value) == NOT_FINITE
    assert sampler.host_reads == 1  # seen at the first read, after step 3 drew from NaN


@pytest.mark.parametrize("flags, message", [
    ({"host_every": 0}, "host_every 0: give an integer >= 1"),
    ({"cuda_graph": True}, "a CUDA graph needs the model on a CUDA device; it is on cpu")])
def test_bad_decoding_settings_are_one_line_errors(flags, message):
    model, tokenizer, bos, eos = _model_with_likely_eos("qwen2")
    with pytest.raises(SelftrainError) as raised:
        BosSampler(model, bos, eos, len(tokenizer), temperature=1.0, max_new_tokens=8,
                   batch_size=2, seed=0, **flags)
    assert str(raised.value) == message


def test_rows_decoding_on_past_their_end_stay_inside_the_models_positions():
    # a row that ended decodes on until the host looks; fed at its own position it would reach
    # cap + host_every - 2, past a learned position table the cap alone fits in
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=264, n_positions=14, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    runs = {every: {s.id: (s.tokens, s.finished) for s in BosSampler(
        model, 1, 2, 264, temperature=1.0, max_new_tokens=13, batch_size=4, seed=0,
        host_every=every).sample(range(12))} for every in (1, 8)}
    assert runs[8] == runs[1]
    assert max(len(tokens) for tokens, _ in runs[1].values()) == 13
