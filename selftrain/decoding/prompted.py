"""Prompted decoding with the BOS sampler's slot cache: prefill a row, then decode with the rest.

Benchmark generation (lm-eval's ``generate_until``) continues prompts of many lengths, and
plain batched ``generate`` left-pads them and keeps every row until the batch's longest ends.
Here each row owns a slot of the :class:`~selftrain.decoding.slot_cache.SlotCache`, as in the
BOS sampler: a row that ends (EOS, its own length cap, or a stop string in its decoded text)
hands its slot to the next prompt at the very next step, and finished rows are dropped once no
prompts are left.

Prompts are prefilled, all but their last token, ``batch_size`` at a time in one forward:
right-padded, so under the causal mask no real token ever sees a pad. The tokens every prompt
of the batch starts with (a task's fixed few-shot block, as MATH's) are computed once and
copied to each row. Each prompt's keys/values are kept until its row starts, then written into
its slot, in the columns just before the shared write column, and its last prompt token is fed
with the other rows at the next step. Its positions count from its own first token
(``column - start``), so every row computes what an unbatched run would. The write column
never drops below the longest prompt, so any prompt fits before it; when the buffer is full
the live window is shifted back, as in the sampler.

Greedy decoding is temperature 0 (the argmax, first index on ties, as ``generate`` takes it);
above 0 each token is drawn from the prompt's own stream (seed, prompt id, step)
(:mod:`.draw`), so a completion does not depend on the batch or the order.

After its prefill a row decodes with the sampler's device-only step (:mod:`.slots`): end ids
and length caps end it on the device, and stop strings are checked on the host when it looks,
every ``host_every`` steps, at each new length in turn, so a completion ends exactly where a
check after every token would end it.
"""

from __future__ import annotations

import inspect
import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache

from selftrain.decoding.draw import device_uniforms, draw_unchecked, draw_workspace, seed_key
from selftrain.decoding.slot_cache import SlotCache
from selftrain.decoding.slots import DeviceRows, SlotDecoding
from selftrain.errors import SelftrainError


@dataclass
class Prompt:
    """One prompt to continue.

    Args:
        id: the caller's id for it (also its random stream when sampling).
        tokens: the prompt's token ids (at least one).
        max_new_tokens: the length cap of its continuation.
        stop: stop strings: the row ends as soon as one appears in its decoded continuation,
            and :attr:`Completion.text` is cut at the first one (None: no stop strings).
    """

    id: int
    tokens: list[int]
    max_new_tokens: int
    stop: list[str] | None = None


@dataclass
class Completion:
    """One finished continuation.

    Args:
        id: the prompt's id.
        tokens: the generated ids (the EOS included when ``reason`` is ``"eos"``).
        reason: what ended it: ``"eos"``, ``"stop"`` (a stop string) or ``"length"``.
        text: the decoded continuation cut at the first stop string (None without a decoder).
    """

    id: int
    tokens: list[int]
    reason: Literal["eos", "stop", "length"]
    text: str | None = None


class PromptedDecoder(SlotDecoding):
    """Continues prompts of any length with slot refill; greedy at temperature 0.

    Args:
        model: a Hugging Face causal LM whose attention takes a 4D mask and position ids.
        eos_token_id: the id (or ids) that end a continuation; None: none does.
        batch_size: rows decoded together.
        temperature: 0 for greedy decoding, else the softmax temperature.
        seed: base seed when sampling; prompt i draws from (seed, id, step) alone.
        top_k: when sampling, keep the k most likely tokens; 0 keeps all.
        top_p: when sampling, the nucleus mass; 1.0 keeps all.
        vocab_size: ids at or above it are never produced; None: all of the model's logits.
        decode: token ids -> text, needed for stop strings and :attr:`Completion.text`.
        host_every: decoding steps between two looks of the host at the batch (>= 1); None:
            :func:`~selftrain.decoding.slots.default_host_every` for the model's device.
        cuda_graph: replay each step as a captured CUDA graph (a CUDA model only).
        static_shapes: keep every shape fixed, as a CUDA graph needs; ``cuda_graph`` implies
            it.
    """

    def __init__(self, model: torch.nn.Module, eos_token_id: int | Sequence[int] | None,
                 batch_size: int, temperature: float = 0.0, seed: int = 0, top_k: int = 0,
                 top_p: float = 1.0, vocab_size: int | None = None,
                 decode: Callable[[list[int]], str] | None = None,
                 host_every: int | None = None, cuda_graph: bool = False,
                 static_shapes: bool = False):
        super().__init__(model, host_every, cuda_graph, static_shapes)
        if eos_token_id is None:
            eos_token_id = []
        self.eos_token_ids = {int(eos_token_id)} if isinstance(eos_token_id, int) else {
            int(token) for token in eos_token_id}
        if batch_size < 1:
            raise SelftrainError(f"batch_size {batch_size}: give an integer >= 1")
        if temperature < 0:
            raise SelftrainError(f"temperature {temperature}: give 0 (greedy) or more")
        self.batch_size = batch_size
        self.temperature = temperature
        self.seed = seed
        self.top_k = top_k
        self.top_p = top_p
        self.vocab_size = vocab_size
        self.decode_text = decode
        config = model.config.get_text_config()
        self.context = getattr(config, "max_position_embeddings", None)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._key = seed_key(seed)
        self._end_ids = (torch.tensor(sorted(self.eos_token_ids), device=self.device)
                         if self.eos_token_ids else None)
        self.prefilled_tokens = 0
        """prompt tokens run through prefill forwards (a shared prefix once per batch)."""

    def check(self, prompt: Prompt) -> None:
        """Raise :class:`SelftrainError` (one line) if ``prompt`` cannot be decoded.

        Args:
            prompt: the prompt to check.
        """
        if not prompt.tokens:
            raise SelftrainError(f"prompt {prompt.id} is empty: give at least one token")
        if prompt.max_new_tokens < 1:
            raise SelftrainError(f"prompt {prompt.id}: max_new_tokens {prompt.max_new_tokens} "
                                 "must be >= 1")
        if prompt.stop is not None:
            if (not isinstance(prompt.stop, list | tuple) or not prompt.stop
                    or not all(isinstance(s, str) and s for s in prompt.stop)):
                raise SelftrainError(f"prompt {prompt.id}: stop strings {prompt.stop!r}: give "
                                     "a non-empty list of non-empty strings, or None")
            if self.decode_text is None:
                raise SelftrainError("stop strings need a decode function (decode=...)")
        if self.context is not None and len(prompt.tokens) > self.context - prompt.max_new_tokens:
            raise SelftrainError(
                f"prompt {prompt.id} has {len(prompt.tokens)} tokens, more than the model's "
                f"context ({self.context}, max_position_embeddings) minus max_new_tokens "
                f"({prompt.max_new_tokens}); shorten it or lower max_new_tokens")

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt]) -> Iterator[Completion]:
        """Continue every prompt, yielding each :class:`Completion` as soon as it ends.

        Completions come out in completion order; prompts start in the order given. Runs
        under ``no_grad``, not ``inference_mode``: under autocast, inference mode turns off
        autocast's cache of cast weights, so every forward would cast every weight again
        (on a CPU, half the decoding time).

        Args:
            prompts: the prompts (all checked before any decoding).
        """
        for prompt in prompts:
            self.check(prompt)
        if not prompts:
            return
        longest = max(len(p.tokens) for p in prompts)
        most_new = max(p.max_new_tokens for p in prompts)
        self._floor = longest - 1  # the write column never drops below it: any prompt fits
        cache, columns = self._new_cache(most_new)
        pending = _Prefilled(self, iter(prompts))
        first = [next(pending) for _ in range(min(self.batch_size, len(prompts)))]
        rows = DeviceRows.empty(len(first), most_new, self.device)
        rows.notes = [_RowNote(prompt) for prompt in first]
        rows.start_rows([self._prefill(cache, rows, b, prompt) for b, prompt in enumerate(first)])
        workspace = None
        if self.temperature > 0:
            width = self.vocab_size or self.model.get_output_embeddings().weight.shape[0]
            workspace = draw_workspace(len(first), width, self.device)

        def step() -> None:
            logits = self._forward(cache, rows, columns)
            if self.vocab_size is not None:
                logits = logits[:, : self.vocab_size]
            drawable = None
            if self.temperature == 0:
                drawn = logits.argmax(dim=-1)
            else:
                uniforms = device_uniforms(self._key, rows.sample_id, rows.length)
                drawn, _, drawable = draw_unchecked(logits, uniforms, self.temperature,
                                                    self.top_k, self.top_p, workspace)
            self._advance(rows, drawn, None, drawable, self._end_ids)

        yield from self._decode(cache, rows, step, lambda: self._collect(cache, rows, pending))

    def _mask(self, start: torch.Tensor, columns: torch.Tensor,
              column: int | torch.Tensor) -> torch.Tensor:
        """The sampler's additive mask, in the autocast dtype when autocast is on.

        SDPA then gets a mask of its query's dtype.
        """
        if torch.is_autocast_enabled(self.device.type):
            wanted = torch.get_autocast_dtype(self.device.type)
            if wanted != self.mask_dtype:
                kept, self.mask_dtype = self.mask_dtype, wanted
                try:
                    return super()._mask(start, columns, column)
                finally:
                    self.mask_dtype = kept
        return super()._mask(start, columns, column)

    def _prefill_batch(self, prompts: list[Prompt]) -> list[list[tuple[torch.Tensor, ...]]]:
        """Keys/values of all but each prompt's last token, from one right-padded forward.

        Returns:
            per prompt, per layer, its ([1, heads, length, head_dim] keys, values); no layers
            for a one-token prompt.
        """
        lengths = [len(prompt.tokens) - 1 for prompt in prompts]
        longest = max(lengths)
        if not longest:
            return [[] for _ in prompts]
        ids = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : lengths[row]] = torch.tensor(prompt.tokens[:-1])
        ids = ids.to(self.device)
        shared = common_prefix([prompt.tokens[:length] for prompt, length in zip(
            prompts, lengths, strict=True)]) if len(prompts) > 1 else 0
        prefix = DynamicCache()
        kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
        positions = torch.arange(longest, device=self.device).unsqueeze(0)
        if shared:  # the few-shot block every prompt starts with: computed once, then copied
            self.model(input_ids=ids[:1, :shared], position_ids=positions[:, :shared],
                       use_cache=True, **{self._cache_argument: prefix}, **kwargs)
            for layer in prefix.layers:
                layer.batch_repeat_interleave(len(prompts))
        self.prefilled_tokens += shared + sum(max(0, length - shared) for length in lengths)
        if longest > shared:
            self.model(input_ids=ids[:, shared:],
                       position_ids=positions[:, shared:].expand(len(ids), -1),
                       use_cache=True, **{self._cache_argument: prefix}, **kwargs)
        return [[(layer.keys[row:row + 1, :, :length], layer.values[row:row + 1, :, :length])
                 for layer in prefix.layers] if length else []
                for row, length in enumerate(lengths)]

    def _prefill(self, cache: SlotCache, rows: DeviceRows, row: int,
                 prompt: _PrefilledPrompt) -> tuple[int, int, int, int, int]:
        """Write a prefilled prompt into ``row``, ending at the write column.

        Returns:
            The row's start for :meth:`DeviceRows.start_rows`.
        """
        length = len(prompt.tokens) - 1
        if length:
            cache.write_row(row, len(rows.ids), [keys for keys, _ in prompt.states],
                            [values for _, values in prompt.states])
        prompt.states = []  # written: the prefill's buffers go once its whole batch is
        return row, prompt.id, cache.column - length, prompt.tokens[-1], prompt.max_new_tokens

    def _collect(self, cache: SlotCache, rows: DeviceRows,
                 pending: Iterator[_PrefilledPrompt]) -> Iterator[Completion]:
        """One read of the batch: yield the rows that ended and start the next prompts there.

        A row with stop strings is checked at every length it reached since the last read, in
        order, so it ends where a check after every token would end it. A row with no prompt
        left is parked on the write column, feeding a dummy token, done.
        """
        read = self._read(rows)
        starts = []
        for b, note in enumerate(rows.notes):
            if note is None:
                continue
            prompt, length = note.prompt, int(read.length[b])
            tokens = read.tokens[b, :length].tolist()
            reason = text = None
            if prompt.stop:
                for end in range(note.checked + 1, length + 1):
                    reason, text = self._ended(prompt, tokens[:end])
                    if reason is not None:
                        tokens = tokens[:end]
                        break
                note.checked = length
            elif read.done[b]:
                reason, text = self._ended(prompt, tokens)
            if reason is None:
                continue
            yield Completion(id=prompt.id, tokens=tokens, reason=reason, text=text)
            following = next(pending, None)
            rows.notes[b] = None if following is None else _RowNote(following)
            starts.append((b, None, cache.column, 0, 1) if following is None else
                          self._prefill(cache, rows, b, following))
        rows.start_rows(starts)

    def _ended(self, prompt: Prompt, tokens: list[int]) -> tuple[str | None, str | None]:
        """Why the row ended (None: it goes on) and its continuation's text, cut at a stop."""
        if prompt.stop:
            text = self.decode_text(tokens)
            cut = cut_at_stop(text, prompt.stop)
            if len(cut) < len(text) or any(s in text for s in prompt.stop):
                return "stop", cut
        if tokens[-1] in self.eos_token_ids:
            reason = "eos"
        elif len(tokens) >= prompt.max_new_tokens:
            reason = "length"
        else:
            return None, None
        if self.decode_text is None:
            return reason, None
        return reason, cut_at_stop(self.decode_text(tokens), prompt.stop or [])


@dataclass
class _RowNote:
    """What the host keeps for a decoding row: its prompt, how far its stops were checked."""

    prompt: Prompt
    checked: int = 0


@dataclass
class _PrefilledPrompt(Prompt):
    """A prompt with its prefilled keys/values, per layer, until its row starts."""

    states: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class _Prefilled:
    """The prompts in order, each prefilled with the ``batch_size`` - 1 after it.

    Rows start one by one as others end; the prompts they will take are prefilled together
    when the first of them is needed, so a prefill forward always carries a batch.
    """

    def __init__(self, decoder: PromptedDecoder, prompts: Iterator[Prompt]):
        self.decoder = decoder
        self.prompts = prompts
        self.ready: deque[_PrefilledPrompt] = deque()

    def __iter__(self) -> _Prefilled:
        return self

    def __next__(self) -> _PrefilledPrompt:
        if not self.ready:
            batch = list(itertools.islice(self.prompts, self.decoder.batch_size))
            if not batch:
                raise StopIteration
            for prompt, states in zip(batch, self.decoder._prefill_batch(batch), strict=True):
                self.ready.append(_PrefilledPrompt(**vars(prompt), states=states))
        return self.ready.popleft()


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence shares (0 for none or no sequences).

    Args:
        sequences: token id lists.
    """
    if not sequences:
        return 0
    first, shared = sequences[0], min(len(sequence) for sequence in sequences)
    for sequence in sequences[1:]:
        same = 0
        while same < shared and sequence[same] == first[same]:
            same += 1
        shared = same
    return shared


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (empty strings are ignored).

    Args:
        text: decoded continuation.
        stop: stop strings.
    """
    found = [text.find(term) for term in stop if term]
    return text[: min([i for i in found if i >= 0], default=len(text))]
