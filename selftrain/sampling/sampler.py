"""The BOS sampler: KV-cached, slot-refilling, per-sample deterministic decoding.

Every sequence starts as the single BOS id, so there is no prompt to prefill: each step feeds
exactly one token per row. That makes continuous batching simple. A row that ends (EOS or the
length cap) hands its slot to the next sample id at the very next step; when no ids are left,
finished rows are dropped from the batch, so no compute is spent on them.

All rows write their new key/value at the same cache column. A refilled row starts at the
current column with position 0, and a 4D mask hides the columns before its start. When the
buffer is full, the live window is shifted back to column 0 (rows never span more than
``max_new_tokens`` columns, so the buffer needs only a little headroom).

Randomness comes from a counter-based hash of (seed, sample id, step), turned into one uniform
per token and drawn by inverse CDF. Sample i is therefore the same whatever the batch size, the
number of processes, or where a resumed run restarted (up to floating-point differences
between kernels, which move a draw only when it lands within ~1e-7 of a CDF boundary).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

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
    if not bool((total > 0).all()):
        raise SelftrainError("the source's logits are not finite (an overflow in float16, or "
                             "a --temperature too small to divide by); sample in bfloat16 or "
                             "float32 (--dtype) or raise --temperature")
    chosen = weights.gather(-1, index.unsqueeze(-1)).squeeze(-1).double() / total
    tokens = index if order is None else order.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return tokens, chosen.log()


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


class _SlotLayer(CacheLayerMixin):
    """One layer's key/value buffer [rows, heads, columns, head_dim], written one column a step."""

    is_compileable = False

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.keys, self.values = (
            states.new_zeros((*states.shape[:2], self.owner.capacity, states.shape[-1]))
            for states in (key_states, value_states))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        column = self.owner.column
        self.keys[:, :, column] = key_states[:, :, -1]
        self.values[:, :, column] = value_states[:, :, -1]
        return self.keys[:, :, : column + 1], self.values[:, :, : column + 1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.column + 1, 0

    def get_seq_length(self) -> int:
        return self.owner.column

    def get_max_length(self) -> int:
        return self.owner.capacity


class SlotCache(Cache):
    """KV cache for :class:`BosSampler`: fixed capacity, one shared write column per step.

    Args:
        num_layers: decoder layers of the model.
        capacity: columns per layer buffer (``max_new_tokens`` plus headroom).
    """

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.column = 0
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    def shift(self, origin: int) -> None:
        """Move columns [origin, column) to the front; the write column moves back by origin."""
        live = self.column - origin
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[:, :, :live] = layer.keys[:, :, origin: self.column].clone()
                layer.values[:, :, :live] = layer.values[:, :, origin: self.column].clone()
        self.column = live

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (drops finished rows once no ids are left)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys = layer.keys.index_select(0, rows)
                layer.values = layer.values.index_select(0, rows)


@dataclass
class Sample:
    """One finished sequence.

    Args:
        id: the corpus id it was sampled for.
        tokens: the sampled ids after BOS (EOS included when ``finished``).
        finished: it ended on EOS rather than at the length cap.
        logprobs: per-token log-probabilities under the sampling distribution (when recorded).
    """

    id: int
    tokens: list[int]
    finished: bool
    logprobs: list[float] | None = None


class BosSampler:
    """Samples sequences from a causal LM's BOS token with slot refill and per-sample seeds.

    Args:
        model: a Hugging Face causal LM whose attention takes a 4D mask and position ids.
        bos_token_id: the id every sequence starts from.
        eos_token_id: the id that ends a sequence (None: only the length cap ends one).
        vocab_size: ids at or above it (padded embedding rows) are never sampled.
        temperature: softmax temperature (> 0).
        max_new_tokens: length cap after BOS.
        batch_size: rows decoded together.
        seed: base seed; sample i draws from (seed, i) alone.
        top_k: keep the k most likely tokens; 0 keeps all.
        top_p: nucleus mass; 1.0 keeps all.
        record_logprobs: keep per-token log-probabilities on each :class:`Sample`.
    """

    def __init__(self, model: torch.nn.Module, bos_token_id: int, eos_token_id: int | None,
                 vocab_size: int, temperature: float, max_new_tokens: int, batch_size: int,
                 seed: int, top_k: int = 0, top_p: float = 1.0, record_logprobs: bool = False):
        self.model = model
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.seed = seed
        self.top_k = top_k
        self.top_p = top_p
        self.record_logprobs = record_logprobs
        self.device = next(model.parameters()).device
        self.mask_dtype = next(model.parameters()).dtype
        if not self.mask_dtype.is_floating_point:
            self.mask_dtype = torch.float32
        implementation = getattr(model.config, "_attn_implementation", None) or ""
        if "flash" in implementation:
            raise SelftrainError(f"the source model uses {implementation}, which cannot take "
                                 "the per-row 4D mask the sampler needs; load it with sdpa or "
                                 "eager attention")
        self.steps = 0
        """decoding steps taken (one forward each), for throughput accounting."""
        self.rows_computed = 0
        """sum over steps of the batch rows computed."""

    @torch.inference_mode()
    def sample(self, ids: Iterable[int]) -> Iterator[Sample]:
        """Sample every id in ``ids``, yielding each :class:`Sample` as soon as it ends.

        Samples come out in completion order, not id order.

        Args:
            ids: corpus ids to sample.
        """
        pending = iter(ids)
        slot_ids: list[int | None] = list(islice(pending, self.batch_size))
        if not slot_ids:
            return
        rows = len(slot_ids)
        capacity = self.max_new_tokens + max(16, self.max_new_tokens // 4)
        cache = SlotCache(self.model.config.get_text_config().num_hidden_layers, capacity)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logprobs: list[list[float]] = [[] for _ in range(rows)]
        start = torch.zeros(rows, dtype=torch.long, device=self.device)
        next_input = torch.full((rows,), self.bos_token_id, dtype=torch.long, device=self.device)
        columns = torch.arange(capacity, device=self.device)
        workspace = draw_workspace(rows, self.vocab_size, self.device)

        while any(sample_id is not None for sample_id in slot_ids):
            if cache.column == capacity:
                origin = int(start.min())
                cache.shift(origin)
                start -= origin
            column = cache.column
            hidden = columns[: column + 1].unsqueeze(0) < start.unsqueeze(1)
            # additive, so eager attention (which adds the mask) and SDPA read it alike
            mask = torch.zeros(hidden.shape, dtype=self.mask_dtype, device=self.device)
            mask = mask.masked_fill_(hidden, torch.finfo(self.mask_dtype).min)[:, None, None, :]
            logits = self.model(input_ids=next_input.unsqueeze(1), attention_mask=mask,
                                position_ids=(column - start).unsqueeze(1),
                                past_key_values=cache, use_cache=True).logits[:, -1]
            cache.column += 1
            self.steps += 1
            self.rows_computed += len(slot_ids)

            live = [b for b, sample_id in enumerate(slot_ids) if sample_id is not None]
            ids_now = np.array([slot_ids[b] if slot_ids[b] is not None else 0
                                for b in range(len(slot_ids))], dtype=np.int64)
            steps_now = np.array([len(t) for t in tokens], dtype=np.int64)
            uniforms = torch.from_numpy(sample_uniforms(self.seed, ids_now, steps_now))
            drawn, drawn_logprobs = draw_tokens(logits[:, : self.vocab_size], uniforms,
                                                self.temperature, self.top_k, self.top_p,
                                                workspace)
            drawn_host = drawn.tolist()
            logprobs_host = drawn_logprobs.tolist() if self.record_logprobs else None

            refilled = []
            for b in live:
                token = drawn_host[b]
                tokens[b].append(token)
                if logprobs_host is not None:
                    logprobs[b].append(logprobs_host[b])
                ended_on_eos = token == self.eos_token_id
                if ended_on_eos or len(tokens[b]) >= self.max_new_tokens:
                    yield Sample(id=slot_ids[b], tokens=tokens[b], finished=ended_on_eos,
                                 logprobs=logprobs[b] if self.record_logprobs else None)
                    tokens[b], logprobs[b] = [], []
                    slot_ids[b] = next(pending, None)
                    refilled.append(b)
            next_input = drawn
            if refilled:
                index = torch.tensor(refilled, device=self.device)
                next_input[index] = self.bos_token_id
                start[index] = cache.column  # also parks idle rows on their own column

            keep = [b for b, sample_id in enumerate(slot_ids) if sample_id is not None]
            idle = len(slot_ids) - len(keep)
            if idle and 4 * idle >= len(slot_ids) and keep:
                index = torch.tensor(keep, device=self.device)
                cache.keep_rows(index)
                start, next_input = start[index], next_input[index]
                slot_ids = [slot_ids[b] for b in keep]
                tokens = [tokens[b] for b in keep]
                logprobs = [logprobs[b] for b in keep]
