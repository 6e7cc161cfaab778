"""The BOS sampler: KV-cached, slot-refilling, per-sample deterministic decoding.

Every sequence starts as the single BOS id, so there is no prompt to prefill: each step feeds
exactly one token per row. That makes continuous batching simple. A row that ends (EOS or the
length cap) hands its slot to the next sample id at the very next step; when no ids are left,
finished rows are dropped from the batch, so no compute is spent on them.

All rows write their new key/value at the same cache column (:mod:`.slot_cache`). A refilled row
starts at the current column with position 0, and a 4D mask hides the columns before its start.
When the buffer is full, the live window is shifted back to column 0 (rows never span more than
``max_new_tokens`` columns, so the buffer needs only a little headroom).

Each token is drawn from the row's own random stream, a pure function of (seed, sample id,
step) (:mod:`.draw`), so sample i is the same whatever the batch size, the number of processes
or where a resumed run restarted.

The model, the step forward and its mask live in :class:`SlotDecoding`, which the prompted
decoder (:mod:`.prompted`) shares.

The cache goes to the model under the name its ``forward`` takes
(:func:`selftrain.models.kv_cache_argument`): ``cache`` in transformers 5.24, where the old
``past_key_values`` warns on every call until its removal in 5.40.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from selftrain.decoding.draw import draw_tokens, draw_workspace, sample_uniforms
from selftrain.decoding.slot_cache import SlotCache
from selftrain.errors import SelftrainError
from selftrain.models import kv_cache_argument


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


@dataclass
class _Slots:
    """The batch rows being decoded; row ``b`` is index ``b`` of every field.

    Args:
        ids: the corpus id each row is sampling; None for a row left idle (no ids left).
        tokens: each row's sampled ids so far.
        logprobs: their log-probabilities (empty unless recorded).
        start: [rows] the cache column where each row's sequence starts (its BOS).
        next_input: [rows] the token each row feeds at the next step.
    """

    ids: list[int | None]
    tokens: list[list[int]]
    logprobs: list[list[float]]
    start: torch.Tensor
    next_input: torch.Tensor

    def live(self) -> list[int]:
        """The rows still sampling an id."""
        return [b for b, sample_id in enumerate(self.ids) if sample_id is not None]

    def keep(self, rows: list[int]) -> None:
        """Keep only the given rows, in order.

        Args:
            rows: row indices to keep.
        """
        index = torch.tensor(rows, device=self.start.device)
        self.start, self.next_input = self.start[index], self.next_input[index]
        self.ids = [self.ids[b] for b in rows]
        self.tokens = [self.tokens[b] for b in rows]
        self.logprobs = [self.logprobs[b] for b in rows]


class SlotDecoding:
    """What every slot-cache decoder shares: the model, its cache argument, the step forward.

    :class:`BosSampler` and :class:`selftrain.decoding.prompted.PromptedDecoder` build on it.

    Args:
        model: a Hugging Face causal LM whose attention takes a 4D mask and position ids.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._cache_argument = kv_cache_argument(model)
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

    def _forward(self, cache: SlotCache, slots: _Slots, columns: torch.Tensor) -> torch.Tensor:
        """One decoding step: every row feeds its next token at the cache's write column.

        Args:
            cache: the cache, its write column at this step.
            slots: the rows.
            columns: ``arange(capacity)`` on the device.

        Returns:
            [rows, model vocab] next-token logits.
        """
        column = cache.column
        logits = self.model(input_ids=slots.next_input.unsqueeze(1),
                            attention_mask=self._mask(slots.start, columns[: column + 1]),
                            position_ids=(column - slots.start).unsqueeze(1),
                            use_cache=True, **{self._cache_argument: cache}).logits[:, -1]
        cache.column += 1
        self.steps += 1
        self.rows_computed += len(slots.ids)
        return logits

    def _mask(self, start: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The 4D mask [rows, 1, 1, columns] hiding from each row the columns before its start.

        Additive, so eager attention (which adds the mask) and SDPA read it alike.
        """
        hidden = columns.unsqueeze(0) < start.unsqueeze(1)
        mask = torch.zeros(hidden.shape, dtype=self.mask_dtype, device=self.device)
        return mask.masked_fill_(hidden, torch.finfo(self.mask_dtype).min)[:, None, None, :]

    def _drop_idle_rows(self, cache: SlotCache, slots: _Slots) -> None:
        """Once a quarter of the rows are idle (no ids left), stop computing them."""
        keep = slots.live()
        idle = len(slots.ids) - len(keep)
        if idle and 4 * idle >= len(slots.ids) and keep:
            cache.keep_rows(torch.tensor(keep, device=self.device))
            slots.keep(keep)


class BosSampler(SlotDecoding):
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
        super().__init__(model)
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

    @torch.inference_mode()
    def sample(self, ids: Iterable[int]) -> Iterator[Sample]:
        """Sample every id in ``ids``, yielding each :class:`Sample` as soon as it ends.

        Samples come out in completion order, not id order.

        Args:
            ids: corpus ids to sample.
        """
        pending = iter(ids)
        first = list(islice(pending, self.batch_size))
        if not first:
            return
        slots = self._fill_slots(first)
        capacity = self.max_new_tokens + max(16, self.max_new_tokens // 4)
        cache = SlotCache(self.model.config.get_text_config().num_hidden_layers, capacity)
        columns = torch.arange(capacity, device=self.device)
        workspace = draw_workspace(len(first), self.vocab_size, self.device)
        while slots.live():
            if cache.column == capacity:
                self._rewind(cache, slots)
            logits = self._forward(cache, slots, columns)
            drawn, drawn_logprobs = self._draw(logits, slots, workspace)
            yield from self._advance(slots, drawn, drawn_logprobs, pending, cache.column)
            self._drop_idle_rows(cache, slots)

    def _fill_slots(self, ids: list[int]) -> _Slots:
        """One row per id, each about to feed BOS at column 0."""
        rows = len(ids)
        return _Slots(
            ids=list(ids), tokens=[[] for _ in range(rows)], logprobs=[[] for _ in range(rows)],
            start=torch.zeros(rows, dtype=torch.long, device=self.device),
            next_input=torch.full((rows,), self.bos_token_id, dtype=torch.long,
                                  device=self.device))

    @staticmethod
    def _rewind(cache: SlotCache, slots: _Slots) -> None:
        """Shift the live window of a full cache back to column 0."""
        origin = int(slots.start.min())
        cache.shift(origin)
        slots.start -= origin

    def _draw(self, logits: torch.Tensor, slots: _Slots,
              workspace: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's next token, from its own stream (seed, id, step), and its log-probability.

        Idle rows draw too (as id 0), so the batch keeps its shape; their tokens are unused.
        """
        ids_now = np.array([sample_id if sample_id is not None else 0 for sample_id in slots.ids],
                           dtype=np.int64)
        steps_now = np.array([len(tokens) for tokens in slots.tokens], dtype=np.int64)
        uniforms = torch.from_numpy(sample_uniforms(self.seed, ids_now, steps_now))
        return draw_tokens(logits[:, : self.vocab_size], uniforms, self.temperature, self.top_k,
                           self.top_p, workspace)

    def _advance(self, slots: _Slots, drawn: torch.Tensor, drawn_logprobs: torch.Tensor,
                 pending: Iterator[int], column: int) -> Iterator[Sample]:
        """Append each live row's token, yield the rows that ended and refill their slots.

        Args:
            slots: the rows.
            drawn: [rows] the tokens drawn at this step.
            drawn_logprobs: [rows] their log-probabilities.
            pending: the ids not started yet.
            column: the cache column a refilled row starts at (the next write column).
        """
        live = slots.live()
        drawn_host = drawn.tolist()
        logprobs_host = drawn_logprobs.tolist() if self.record_logprobs else None
        refilled = []
        for b in live:
            token = drawn_host[b]
            slots.tokens[b].append(token)
            if logprobs_host is not None:
                slots.logprobs[b].append(logprobs_host[b])
            ended_on_eos = token == self.eos_token_id
            if ended_on_eos or len(slots.tokens[b]) >= self.max_new_tokens:
                yield Sample(id=slots.ids[b], tokens=slots.tokens[b], finished=ended_on_eos,
                             logprobs=slots.logprobs[b] if self.record_logprobs else None)
                slots.tokens[b], slots.logprobs[b] = [], []
                slots.ids[b] = next(pending, None)
                refilled.append(b)
        slots.next_input = drawn
        if refilled:
            index = torch.tensor(refilled, device=self.device)
            slots.next_input[index] = self.bos_token_id
            slots.start[index] = column  # also parks idle rows on their own column
