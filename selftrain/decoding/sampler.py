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

A step runs on the device alone and the host looks at the batch every ``host_every`` steps
(:mod:`.slots`, which the prompted decoder :mod:`.prompted` shares).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch

from selftrain.decoding.draw import device_uniforms, draw_unchecked, draw_workspace, seed_key
from selftrain.decoding.slot_cache import SlotCache
from selftrain.decoding.slots import DeviceRows, SlotDecoding


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


class BosSampler(SlotDecoding):
    """Samples sequences from a causal LM's BOS token with slot refill and per-sample seeds.

    The uniforms are hashed on the device (:func:`~selftrain.decoding.draw.device_uniforms`),
    so a step needs nothing from the host; samples are the same for every ``host_every``.

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
            :func:`~selftrain.decoding.slots.default_host_every` for the model's device.
        cuda_graph: replay each step as a captured CUDA graph (a CUDA model only).
        static_shapes: keep every shape fixed (all rows to the end, the whole cache attended
            under a mask), as a CUDA graph needs; ``cuda_graph`` implies it.
    """

    def __init__(self, model: torch.nn.Module, bos_token_id: int, eos_token_id: int | None,
                 vocab_size: int, temperature: float, max_new_tokens: int, batch_size: int,
                 seed: int, top_k: int = 0, top_p: float = 1.0, record_logprobs: bool = False,
                 host_every: int | None = None, cuda_graph: bool = False,
                 static_shapes: bool = False):
        super().__init__(model, host_every, cuda_graph, static_shapes)
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
        self._key = seed_key(seed)
        self._end_ids = (None if eos_token_id is None else
                         torch.tensor([eos_token_id], device=self.device))

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
        cache, columns = self._new_cache(self.max_new_tokens)
        rows = DeviceRows.empty(len(first), self.max_new_tokens, self.device)
        rows.start_rows([(b, sample_id, 0, self.bos_token_id, self.max_new_tokens)
                         for b, sample_id in enumerate(first)])
        workspace = draw_workspace(len(first), self.vocab_size, self.device)

        def step() -> None:
            logits = self._forward(cache, rows, columns)
            uniforms = device_uniforms(self._key, rows.sample_id, rows.length)
            drawn, logprobs, drawable = draw_unchecked(
                logits[:, : self.vocab_size], uniforms, self.temperature, self.top_k,
                self.top_p, workspace)
            self._advance(rows, drawn, logprobs if self.record_logprobs else None, drawable,
                          self._end_ids)

        yield from self._decode(cache, rows, step, lambda: self._collect(rows, pending, cache))

    def _collect(self, rows: DeviceRows, pending: Iterator[int],
                 cache: SlotCache) -> Iterator[Sample]:
        """One read of the batch: yield the rows that ended and refill their slots.

        A refilled row starts at the write column, feeding BOS; a row with no id left is
        parked there (its mask then hides everything before it) and stays done.
        """
        read = self._read(rows, logprobs=self.record_logprobs)
        refill = []
        for b, sample_id in enumerate(rows.ids):
            if sample_id is None or not read.done[b]:
                continue
            length = int(read.length[b])
            yield Sample(id=sample_id, tokens=read.tokens[b, :length].tolist(),
                         finished=bool(read.on_eos[b]),
                         logprobs=(read.logprobs[b, :length].tolist() if self.record_logprobs
                                   else None))
            refill.append((b, next(pending, None), cache.column, self.bos_token_id,
                           self.max_new_tokens))
        rows.start_rows(refill)
