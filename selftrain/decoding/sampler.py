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

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from selftrain.decoding.draw import (
    NOT_FINITE,
    device_uniforms,
    draw_unchecked,
    draw_workspace,
    seed_key,
)
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
        self.host_reads = 0
        """times the decoder read the device's results on the host (a synchronisation each
        on an accelerator)."""

    def _forward(self, cache: SlotCache, next_input: torch.Tensor, start: torch.Tensor,
                 columns: torch.Tensor) -> torch.Tensor:
        """One decoding step's forward: every row feeds its token at the cache's write column.

        Device work only, so a CUDA graph can capture it: the caller counts the step
        (:meth:`_count_step`). A static cache's device column moves on by one here.

        Args:
            cache: the cache, its write column at this step.
            next_input: [rows] the token each row feeds.
            start: [rows] the column where each row's sequence starts.
            columns: ``arange(capacity)`` on the device.

        Returns:
            [rows, model vocab] next-token logits.
        """
        column = cache.column if cache.column_tensor is None else cache.column_tensor
        visible = columns if cache.column_tensor is not None else columns[: cache.column + 1]
        logits = self.model(input_ids=next_input.unsqueeze(1),
                            attention_mask=self._mask(start, visible, column),
                            position_ids=(column - start).unsqueeze(1),
                            use_cache=True, **{self._cache_argument: cache}).logits[:, -1]
        if cache.column_tensor is not None:
            cache.column_tensor.add_(1)
        return logits

    def _count_step(self, cache: SlotCache, rows: int) -> None:
        """The host's side of one step: the write column moves on, the step is counted."""
        cache.column += 1
        self.steps += 1
        self.rows_computed += rows

    def _mask(self, start: torch.Tensor, columns: torch.Tensor,
              column: int | torch.Tensor | None = None) -> torch.Tensor:
        """The 4D mask [rows, 1, 1, columns] hiding from each row the columns before its start.

        Additive, so eager attention (which adds the mask) and SDPA read it alike. With a
        static cache (``column`` a device tensor) it also hides the columns past the write one.
        """
        hidden = columns.unsqueeze(0) < start.unsqueeze(1)
        if isinstance(column, torch.Tensor):
            hidden |= columns.unsqueeze(0) > column
        mask = torch.zeros(hidden.shape, dtype=self.mask_dtype, device=self.device)
        return mask.masked_fill_(hidden, torch.finfo(self.mask_dtype).min)[:, None, None, :]

    def _drop_idle_rows(self, cache: SlotCache, slots: _Slots) -> None:
        """Once a quarter of the rows are idle (no ids left), stop computing them."""
        keep = slots.live()
        idle = len(slots.ids) - len(keep)
        if idle and 4 * idle >= len(slots.ids) and keep:
            cache.keep_rows(torch.tensor(keep, device=self.device))
            slots.keep(keep)


HOST_EVERY = {"cpu": 1, "accelerator": 8}
"""Decoding steps between two looks of the host at the batch, by default (:class:`BosSampler`).

On a CPU a look costs no synchronisation, and every step a row spends past its end is wasted
compute: 1. On an accelerator each look waits for the device; a row that ended wastes on
average ``(k - 1) / 2`` steps, about 3% of a 128-token sample at 8."""


def default_host_every(device: torch.device) -> int:
    """:data:`HOST_EVERY` for a model on ``device``."""
    return HOST_EVERY["cpu" if device.type == "cpu" else "accelerator"]


@dataclass
class _DeviceRows:
    """The sampler's rows as the device holds them; row ``b`` is index ``b`` of every field.

    The host keeps only what it decides itself: which id each row samples and where each row
    starts. Everything a step changes stays on the device until the host next looks.

    Args:
        ids: host: the corpus id each row is sampling; None for a row left idle.
        starts: host: the cache column where each row's sequence starts.
        sample_id: [rows] the ids on the device (0 for an idle row).
        start: [rows] the starts on the device.
        length: [rows] tokens the row has sampled so far (its next draw's step).
        done: [rows] the row ended (EOS or the length cap) or is idle; it goes on decoding
            into a discarded column until the host refills it.
        on_eos: [rows] the row ended on EOS.
        failed: [rows] a draw of the live row had no finite weight.
        next_input: [rows] the token each row feeds at the next step.
        tokens: [rows, max_new_tokens + 1] the sampled ids; the last column takes the draws
            of ended rows.
        logprobs: [rows, max_new_tokens + 1] float64, their log-probabilities.
    """

    ids: list[int | None]
    starts: list[int]
    sample_id: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    done: torch.Tensor
    on_eos: torch.Tensor
    failed: torch.Tensor
    next_input: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        """The device fields, in declaration order."""
        return [self.sample_id, self.start, self.length, self.done, self.on_eos, self.failed,
                self.next_input, self.tokens, self.logprobs]

    def keep(self, rows: list[int]) -> None:
        """Keep only the given rows, in order.

        Args:
            rows: row indices to keep.
        """
        index = torch.tensor(rows, device=self.start.device)
        (self.sample_id, self.start, self.length, self.done, self.on_eos, self.failed,
         self.next_input, self.tokens, self.logprobs) = (
            tensor.index_select(0, index) for tensor in self.tensors())
        self.ids = [self.ids[b] for b in rows]
        self.starts = [self.starts[b] for b in rows]


class BosSampler(SlotDecoding):
    """Samples sequences from a causal LM's BOS token with slot refill and per-sample seeds.

    A decoding step runs on the device alone: the uniforms are hashed there
    (:func:`~selftrain.decoding.draw.device_uniforms`), and each row's length, end and tokens
    are kept there. The host looks at the batch every ``host_every`` steps, one read, to yield
    the samples that ended and refill their rows; a row that ended in between goes on decoding
    into a discarded column. Samples are the same for every ``host_every``.

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
        host_every: decoding steps between two looks of the host at the batch (>= 1); None:
            :func:`default_host_every` for the model's device.
        cuda_graph: replay each step as a captured CUDA graph (a CUDA model only).
        static_shapes: keep every shape fixed (all rows to the end, the whole cache attended
            under a mask), as a CUDA graph needs; ``cuda_graph`` implies it.
    """

    def __init__(self, model: torch.nn.Module, bos_token_id: int, eos_token_id: int | None,
                 vocab_size: int, temperature: float, max_new_tokens: int, batch_size: int,
                 seed: int, top_k: int = 0, top_p: float = 1.0, record_logprobs: bool = False,
                 host_every: int | None = None, cuda_graph: bool = False,
                 static_shapes: bool = False):
        super().__init__(model)
        if host_every is None:
            host_every = default_host_every(self.device)
        if host_every < 1:
            raise SelftrainError(f"host_every {host_every}: give an integer >= 1")
        if cuda_graph and self.device.type != "cuda":
            raise SelftrainError(f"a CUDA graph needs the model on a CUDA device; it is on "
                                 f"{self.device.type}")
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
        self.host_every = host_every
        self.cuda_graph = cuda_graph
        self.static_shapes = static_shapes or cuda_graph
        self._key = seed_key(seed)

    @torch.inference_mode()
    def sample(self, ids: Iterable[int]) -> Iterator[Sample]:
        """Sample every id in ``ids``, yielding each :class:`Sample` once the host sees it end.

        Samples come out in completion order, not id order.

        Args:
            ids: corpus ids to sample.
        """
        pending = iter(ids)
        first = list(islice(pending, self.batch_size))
        if not first:
            return
        rows = self._fill_rows(first)
        every = self.host_every
        capacity = self.max_new_tokens + max(16, self.max_new_tokens // 4, every)
        cache = SlotCache(self.model.config.get_text_config().num_hidden_layers, capacity,
                          static_on=self.device if self.static_shapes else None)
        columns = torch.arange(capacity, device=self.device)
        workspace = draw_workspace(len(first), self.vocab_size, self.device)

        def step() -> None:
            self._step(cache, rows, columns, workspace)

        if self.cuda_graph:
            step = _captured(step, rows.tensors() + [cache.column_tensor])
        while True:
            if cache.column + every > capacity:
                self._rewind(cache, rows)
            for _ in range(every):
                step()
                self._count_step(cache, len(rows.ids))
            yield from self._collect(rows, pending, cache)
            if all(sample_id is None for sample_id in rows.ids):
                return
            if not self.static_shapes:
                self._drop_idle_rows(cache, rows)

    def _fill_rows(self, ids: list[int]) -> _DeviceRows:
        """One row per id, each about to feed BOS at column 0."""
        count, width = len(ids), self.max_new_tokens + 1

        def zeros(dtype: torch.dtype, *shape: int) -> torch.Tensor:
            return torch.zeros((count, *shape), dtype=dtype, device=self.device)

        return _DeviceRows(
            ids=list(ids), starts=[0] * count,
            sample_id=torch.tensor(ids, dtype=torch.long, device=self.device),
            start=zeros(torch.long), length=zeros(torch.long), done=zeros(torch.bool),
            on_eos=zeros(torch.bool), failed=zeros(torch.bool),
            next_input=torch.full((count,), self.bos_token_id, dtype=torch.long,
                                  device=self.device),
            tokens=zeros(torch.long, width), logprobs=zeros(torch.float64, width))

    def _step(self, cache: SlotCache, rows: _DeviceRows, columns: torch.Tensor,
              workspace: torch.Tensor) -> None:
        """One decoding step, on the device alone: forward, draw, and each row's bookkeeping."""
        logits = self._forward(cache, rows.next_input, rows.start, columns)
        uniforms = device_uniforms(self._key, rows.sample_id, rows.length)
        drawn, logprobs, drawable = draw_unchecked(
            logits[:, : self.vocab_size], uniforms, self.temperature, self.top_k, self.top_p,
            workspace)
        live = ~rows.done
        rows.failed |= live & ~drawable
        column = torch.where(live, rows.length, self.max_new_tokens).unsqueeze(1)
        rows.tokens.scatter_(1, column, drawn.unsqueeze(1))
        if self.record_logprobs:
            rows.logprobs.scatter_(1, column, logprobs.unsqueeze(1))
        ended = rows.length + 1 >= self.max_new_tokens
        if self.eos_token_id is not None:
            on_eos = live & (drawn == self.eos_token_id)
            rows.on_eos |= on_eos
            ended |= on_eos
        rows.length += live
        rows.done |= live & ended
        rows.next_input.copy_(drawn)

    def _collect(self, rows: _DeviceRows, pending: Iterator[int],
                 cache: SlotCache) -> Iterator[Sample]:
        """One read of the batch: yield the rows that ended and refill their slots.

        A refilled row starts at the write column, feeding BOS; a row with no id left is
        parked there (its mask then hides everything before it) and stays done.
        """
        fields = [rows.done, rows.on_eos, rows.failed, rows.length]
        packed = [torch.stack(fields, dim=1).long(), rows.tokens]
        if self.record_logprobs:
            packed.append(rows.logprobs.view(torch.int64))  # the float64 bits, read in one go
        host = torch.cat(packed, dim=1).cpu().numpy()
        self.host_reads += 1
        if host[:, 2].any():
            raise SelftrainError(NOT_FINITE)
        width = self.max_new_tokens + 1
        refill = []
        for b, sample_id in enumerate(rows.ids):
            if sample_id is None or not host[b, 0]:
                continue
            length = int(host[b, 3])
            logprobs = None
            if self.record_logprobs:
                logprobs = host[b, 4 + width: 4 + width + length].view(np.float64).tolist()
            yield Sample(id=sample_id, tokens=host[b, 4: 4 + length].tolist(),
                         finished=bool(host[b, 1]), logprobs=logprobs)
            rows.ids[b] = next(pending, None)
            rows.starts[b] = cache.column
            refill.append((b, rows.ids[b] if rows.ids[b] is not None else 0,
                           rows.ids[b] is None))
        if refill:
            update = torch.tensor(refill, dtype=torch.long).to(self.device)
            index = update[:, 0]
            rows.sample_id[index] = update[:, 1]
            rows.done[index] = update[:, 2].bool()
            rows.start[index] = cache.column
            for field in (rows.length, rows.on_eos):
                field[index] = 0
            rows.next_input[index] = self.bos_token_id

    @staticmethod
    def _rewind(cache: SlotCache, rows: _DeviceRows) -> None:
        """Shift the live window of the cache back to column 0 (from the host's own starts)."""
        origin = min(rows.starts)
        cache.shift(origin)
        rows.start -= origin
        rows.starts = [start - origin for start in rows.starts]

    def _drop_idle_rows(self, cache: SlotCache, rows: _DeviceRows) -> None:
        """Once a quarter of the rows are idle (no ids left), stop computing them."""
        keep = [b for b, sample_id in enumerate(rows.ids) if sample_id is not None]
        idle = len(rows.ids) - len(keep)
        if idle and 4 * idle >= len(rows.ids):
            cache.keep_rows(torch.tensor(keep, device=self.device))
            rows.keep(keep)


def _captured(step: Callable[[], None], state: list[torch.Tensor]) -> Callable[[], None]:
    """``step`` captured as a CUDA graph: returns its replay.

    Warm-up steps on a side stream (as CUDA graphs require) change the decoding state, so it is
    saved before and put back after; the cache's columns they wrote are written again before
    any row can see them.

    Args:
        step: one decoding step, device work only, on static shapes.
        state: every tensor the step changes besides the cache's buffers.
    """
    saved = [tensor.clone() for tensor in state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for tensor, value in zip(state, saved, strict=True):
        tensor.copy_(value)
    return graph.replay
