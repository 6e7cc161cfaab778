"""The draw: one token per row from per-sample random streams, by inverse CDF.

Randomness comes from a counter-based hash of (seed, sample id, step), turned into one uniform
per token and drawn by inverse CDF. Sample i is therefore the same whatever the batch size, the
number of processes, or where a resumed run restarted (up to floating-point differences
between kernels, which move a draw only when it lands within ~1e-7 of a CDF boundary).

The hash runs in numpy (:func:`sample_uniforms`) and, bit for bit the same, on the device in
torch's int64 arithmetic (:func:`device_uniforms`), so a decoding step can draw without the host.
"""

from __future__ import annotations

import numpy as np
import torch

from selftrain.errors import SelftrainError

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, vectorized; uint64 arithmetic wraps as intended."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def sample_uniforms(seed: int, sample_ids: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """One uniform in [0, 1) per (sample id, step), a pure function of (seed, id, step).

    Args:
        seed: the run's base seed.
        sample_ids: int array of corpus ids.
        steps: int array (same shape) of token positions within each sample, 0-based.

    Returns:
        float64 array of uniforms with 53 random bits each.
    """
    key = _splitmix64(np.full(sample_ids.shape, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
    key = _splitmix64(key ^ sample_ids.astype(np.uint64))
    bits = _splitmix64(key ^ _splitmix64(steps.astype(np.uint64)))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _as_int64(constant: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return constant - (1 << 64) if constant >= 1 << 63 else constant


_GOLDEN, _MIX1, _MIX2 = (_as_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                                0x94D049BB133111EB))


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The logical (unsigned) right shift of int64 ``x``; torch's ``>>`` keeps the sign."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64_torch(x: torch.Tensor) -> torch.Tensor:
    """:func:`_splitmix64` on int64 tensors: two's-complement sums and products wrap as uint64's."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def seed_key(seed: int) -> int:
    """The per-run half of the hash, the same for every sample (for :func:`device_uniforms`).

    Args:
        seed: the run's base seed.
    """
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    return _as_int64(int(key))


def device_uniforms(key: int, sample_ids: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """:func:`sample_uniforms` computed where the tensors live, equal to it bit for bit.

    Args:
        key: :func:`seed_key` of the run's seed.
        sample_ids: int64 tensor of corpus ids.
        steps: int64 tensor (same shape) of token positions within each sample, 0-based.

    Returns:
        float64 tensor of uniforms in [0, 1).
    """
    mixed = _splitmix64_torch(key ^ sample_ids)
    bits = _splitmix64_torch(mixed ^ _splitmix64_torch(steps))
    return _shift_right(bits, 11).double() * (1.0 / (1 << 53))


CDF_BLOCK = 256
"""Vocabulary block of the two-level inverse CDF (see :func:`_inverse_cdf`)."""


def draw_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float,
                top_k: int = 0, top_p: float = 1.0,
                workspace: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row by inverse CDF from the tempered, optionally truncated softmax.

    Args:
        logits: [rows, vocab] next-token logits (any float dtype); not modified.
        uniforms: [rows] float64 uniforms in [0, 1).
        temperature: softmax temperature (> 0).
        top_k: keep the k most likely tokens; 0 keeps all.
        top_p: keep the smallest most-likely set with mass >= top_p; 1.0 keeps all.
        workspace: float32 [>= rows, vocab rounded up to :data:`CDF_BLOCK`] reused across
            calls (from :func:`draw_workspace`); fresh 50-150k-wide buffers every step cost
            page faults comparable to the draw itself.

    Returns:
        (token ids [rows], log-probabilities of the drawn tokens under the sampling
        distribution [rows]).
    """
    tokens, logprobs, drawable = draw_unchecked(logits, uniforms, temperature, top_k, top_p,
                                                workspace)
    if not bool(drawable.all()):
        raise SelftrainError(NOT_FINITE)
    return tokens, logprobs


NOT_FINITE = ("the source's logits are not finite (an overflow in float16, or a --temperature "
              "too small to divide by); sample in bfloat16 or float32 (--dtype) or raise "
              "--temperature")
"""The one line a draw from non-finite logits ends in."""


def draw_unchecked(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float,
                   top_k: int = 0, top_p: float = 1.0, workspace: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`draw_tokens` without looking at the result on the host.

    Args and the first two results as :func:`draw_tokens`; the third, [rows] bool, says which
    rows could be drawn at all (their weights have a positive finite total): the caller checks
    it when it next reads the device (:data:`NOT_FINITE` where one is False).
    """
    rows, vocab = logits.shape
    if workspace is None:
        workspace = draw_workspace(rows, vocab, logits.device)
    weights = workspace[:rows]
    weights[:, :vocab].copy_(logits)
    weights[:, vocab:].fill_(float("-inf"))
    weights.div_(temperature)
    weights.sub_(weights.amax(dim=-1, keepdim=True)).exp_()  # unnormalized softmax
    order = None
    if top_p < 1.0:
        weights, order = (weights / weights.sum(dim=-1, keepdim=True)).sort(
            dim=-1, descending=True)
        if 0 < top_k < vocab:  # top-p then applies to the renormalized top-k distribution
            weights[:, top_k:] = 0
            weights /= weights.sum(dim=-1, keepdim=True)
        mass_before = weights.cumsum(dim=-1) - weights
        weights = weights.masked_fill(mass_before >= top_p, 0)
    elif 0 < top_k < vocab:
        weights, order = weights.topk(top_k, dim=-1)  # sorted, and far cheaper than a sort
    index, total = _inverse_cdf(weights, uniforms.to(weights.device))
    drawable = total > 0
    # a row without weights draws index 0, a valid id to feed on until the caller checks
    index = torch.where(drawable, index, 0)
    chosen = weights.gather(-1, index.unsqueeze(-1)).squeeze(-1).double() / total
    tokens = index if order is None else order.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return tokens, chosen.log(), drawable


def draw_workspace(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """The float32 buffer :func:`draw_tokens` works in, for ``rows`` rows of ``vocab`` logits."""
    return torch.empty((rows, vocab + (-vocab % CDF_BLOCK)), dtype=torch.float32,
                       device=device)


def _inverse_cdf(weights: torch.Tensor,
                 uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first index whose cumulative weight exceeds ``uniform * total``.

    A float64 cumsum over a 50k-150k vocabulary costs more than the rest of a draw together,
    and a float32 one drifts by ~1e-5 over that many terms. So the vocabulary is cut into
    blocks: block masses (float32 sums of :data:`CDF_BLOCK` terms) are accumulated in float64,
    the block is picked on that CDF, and the token within it on the block's own float64 CDF.

    Returns:
        (indices [rows], total weight [rows] as float64).
    """
    rows, width = weights.shape
    if width % CDF_BLOCK:
        weights = torch.nn.functional.pad(weights, (0, -width % CDF_BLOCK))
    blocks = weights.view(rows, -1, CDF_BLOCK)
    block_cdf = blocks.sum(dim=-1).double().cumsum(dim=-1)
    total = block_cdf[:, -1]
    # Scaling by (1 - 2^-40) keeps the target strictly below the total, so the CDF entry found
    # above it always belongs to a block (and then a token) with non-zero mass.
    target = (uniforms * total * (1.0 - 2.0 ** -40)).unsqueeze(-1)
    chosen_block = torch.searchsorted(block_cdf, target, right=True).clamp_(
        max=block_cdf.shape[-1] - 1)
    mass_before = torch.where(chosen_block > 0,
                              block_cdf.gather(-1, (chosen_block - 1).clamp_(min=0)), 0.0)
    inner = blocks.gather(1, chosen_block.unsqueeze(-1).expand(-1, -1, CDF_BLOCK)).squeeze(1)
    inner_cdf = inner.double().cumsum(dim=-1)
    fraction = (target - mass_before) / (block_cdf.gather(-1, chosen_block) - mass_before)
    inner_target = fraction.clamp_(0.0, 1.0 - 2.0 ** -40) * inner_cdf[:, -1:]
    within = torch.searchsorted(inner_cdf, inner_target, right=True).clamp_(max=CDF_BLOCK - 1)
    return (chosen_block * CDF_BLOCK + within).squeeze(-1), total
