"""selftrain.decoding.draw: per-sample uniforms and the tempered, truncated inverse-CDF draw."""

import numpy as np
import pytest
import torch

from selftrain.decoding.draw import device_uniforms, draw_tokens, sample_uniforms, seed_key
from selftrain.errors import SelftrainError


def test_uniforms_are_a_pure_function_of_seed_id_and_step():
    ids, steps = np.arange(1000), np.arange(1000) % 7
    u = sample_uniforms(5, ids, steps)
    assert np.array_equal(u, sample_uniforms(5, ids, steps))
    assert np.array_equal(u[10:20], sample_uniforms(5, ids[10:20], steps[10:20]))
    assert not np.array_equal(u, sample_uniforms(6, ids, steps))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.03


@pytest.mark.parametrize("seed", [0, 5, 2**63 - 1, 2**64 - 1])
def test_device_uniforms_equal_the_numpy_hash_bit_for_bit(seed):
    # ids and steps up to 2**62 make every product in the hash wrap around 64 bits
    rng = np.random.default_rng(seed % 1000)
    ids = np.concatenate([np.arange(500), rng.integers(0, 2**62, 500)])
    steps = np.concatenate([np.arange(500) % 300, rng.integers(0, 2**40, 500)])
    expected = sample_uniforms(seed, ids, steps)
    got = device_uniforms(seed_key(seed), torch.from_numpy(ids), torch.from_numpy(steps))
    assert got.dtype == torch.float64
    assert np.array_equal(got.numpy(), expected)
    assert not np.array_equal(device_uniforms(seed_key(seed + 1), torch.from_numpy(ids),
                                              torch.from_numpy(steps)).numpy(), expected)


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
