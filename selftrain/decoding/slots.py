"""What both slot-cache decoders share: the rows as the device holds them and the decoding loop.

A decoding step runs on the device alone: the forward at the cache's write column, the pick of
each row's next token, and each row's bookkeeping (its length, whether it ended, its tokens).
The host looks at the batch every ``host_every`` steps, one read, to hand out what ended and
refill those rows; a row that ended in between decodes on into a discarded column. On an
accelerator each look is a synchronisation, so ``host_every`` divides them; what a row samples
does not depend on it.

With static shapes (all rows kept to the end, the whole cache attended under a mask, the write
column a device tensor) the step can be captured once as a CUDA graph and replayed.

:class:`~selftrain.decoding.sampler.BosSampler` and
:class:`~selftrain.decoding.prompted.PromptedDecoder` build on :class:`SlotDecoding`.

The cache goes to the model under the name its ``forward`` takes
(:func:`selftrain.models.kv_cache_argument`): ``cache`` in transformers 5.24, where the old
``past_key_values`` warns on every call until its removal in 5.40.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from selftrain.decoding.draw import NOT_FINITE
from selftrain.decoding.slot_cache import SlotCache
from selftrain.errors import SelftrainError
from selftrain.models import kv_cache_argument

HOST_EVERY = {"cpu": 1, "accelerator": 8}
"""Decoding steps between two looks of the host at the batch, by default.

On a CPU a look costs no synchronisation, and every step a row spends past its end is wasted
compute: 1. On an accelerator each look waits for the device; a row that ended wastes on
average ``(k - 1) / 2`` steps, about 3% of a 128-token sample at 8 (not yet measured on a GPU).
"""


def default_host_every(device: torch.device) -> int:
    """:data:`HOST_EVERY` for a model on ``device``."""
    return HOST_EVERY["cpu" if device.type == "cpu" else "accelerator"]


@dataclass
class DeviceRows:
    """The decoder's rows as the device holds them; row ``b`` is index ``b`` of every field.

    The host keeps only what it decides itself: which id each row decodes and where each row
    starts. Everything a step changes stays on the device until the host next reads it.

    Args:
        ids: host: the id each row is decoding; None for a row left idle.
        starts: host: the cache column where each row's sequence starts.
        notes: host: what the decoder keeps per row besides (the prompted decoder: the
            prompt and how far its stop strings were checked).
        sample_id: [rows] the ids on the device (0 for an idle row): each row's random stream.
        start: [rows] the starts on the device.
        length: [rows] tokens the row has produced so far (its next draw's step).
        cap: [rows] the row's length cap.
        done: [rows] the row ended (an end id or its cap) or is idle.
        on_eos: [rows] the row ended on an end id.
        failed: [rows] a draw of the live row had no finite weight.
        next_input: [rows] the token each row feeds at the next step.
        tokens: [rows, longest cap + 1] the produced ids; the last column takes the draws of
            ended rows.
        logprobs: [rows, longest cap + 1] float64, their log-probabilities (when recorded).
    """

    ids: list[int | None]
    starts: list[int]
    notes: list
    sample_id: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    cap: torch.Tensor
    done: torch.Tensor
    on_eos: torch.Tensor
    failed: torch.Tensor
    next_input: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor

    @classmethod
    def empty(cls, count: int, longest: int, device: torch.device) -> DeviceRows:
        """``count`` idle rows whose caps can reach ``longest``."""

        def zeros(dtype: torch.dtype, *shape: int) -> torch.Tensor:
            return torch.zeros((count, *shape), dtype=dtype, device=device)

        return cls(ids=[None] * count, starts=[0] * count, notes=[None] * count,
                   sample_id=zeros(torch.long),
                   start=zeros(torch.long), length=zeros(torch.long), cap=zeros(torch.long),
                   done=torch.ones(count, dtype=torch.bool, device=device),
                   on_eos=zeros(torch.bool), failed=zeros(torch.bool),
                   next_input=zeros(torch.long), tokens=zeros(torch.long, longest + 1),
                   logprobs=zeros(torch.float64, longest + 1))

    def tensors(self) -> list[torch.Tensor]:
        """The device fields, in declaration order."""
        return [self.sample_id, self.start, self.length, self.cap, self.done, self.on_eos,
                self.failed, self.next_input, self.tokens, self.logprobs]

    def keep(self, rows: list[int]) -> None:
        """Keep only the given rows, in order.

        Args:
            rows: row indices to keep.
        """
        index = torch.tensor(rows, device=self.start.device)
        (self.sample_id, self.start, self.length, self.cap, self.done, self.on_eos,
         self.failed, self.next_input, self.tokens, self.logprobs) = (
            tensor.index_select(0, index) for tensor in self.tensors())
        self.ids = [self.ids[b] for b in rows]
        self.starts = [self.starts[b] for b in rows]
        self.notes = [self.notes[b] for b in rows]

    def start_rows(self, starts: list[tuple[int, int | None, int, int, int]]) -> None:
        """Start rows afresh (or park them idle), with one copy to the device.

        Args:
            starts: per row ``(row, id or None for idle, start column, first input, cap)``.
        """
        if not starts:
            return
        update = torch.tensor([(row, 0 if row_id is None else row_id, row_id is None, start,
                                first, cap) for row, row_id, start, first, cap in starts],
                              dtype=torch.long).to(self.start.device)
        index = update[:, 0]
        self.sample_id[index] = update[:, 1]
        self.done[index] = update[:, 2].bool()
        self.start[index] = update[:, 3]
        self.next_input[index] = update[:, 4]
        self.cap[index] = update[:, 5]
        self.length[index] = 0
        self.on_eos[index] = False
        for row, row_id, start, _, _ in starts:
            self.ids[row], self.starts[row] = row_id, start


@dataclass
class RowsRead:
    """One host read of the rows (numpy, row ``b`` at index ``b``).

    Args:
        done: the row ended (or is idle).
        on_eos: it ended on an end id.
        length: tokens it produced.
        tokens: [rows, width] the produced ids.
        logprobs: [rows, width] their log-probabilities, when recorded.
    """

    done: np.ndarray
    on_eos: np.ndarray
    length: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray | None


class SlotDecoding:
    """What every slot-cache decoder shares: the model, the step on the device, the loop.

    Args:
        model: a Hugging Face causal LM whose attention takes a 4D mask and position ids.
        host_every: decoding steps between two looks of the host at the batch (>= 1); None:
            :func:`default_host_every` for the model's device.
        cuda_graph: replay each step as a captured CUDA graph (a CUDA model only).
        static_shapes: keep every shape fixed (all rows to the end, the whole cache attended
            under a mask), as a CUDA graph needs; ``cuda_graph`` implies it.
    """

    def __init__(self, model: torch.nn.Module, host_every: int | None = None,
                 cuda_graph: bool = False, static_shapes: bool = False):
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
        if host_every is None:
            host_every = default_host_every(self.device)
        if host_every < 1:
            raise SelftrainError(f"host_every {host_every}: give an integer >= 1")
        if cuda_graph and self.device.type != "cuda":
            raise SelftrainError(f"a CUDA graph needs the model on a CUDA device; it is on "
                                 f"{self.device.type}")
        self.host_every = host_every
        self.cuda_graph = cuda_graph
        self.static_shapes = static_shapes or cuda_graph
        self._floor = 0
        """the write column never drops below it (the prompted decoder's longest prompt)."""
        self.steps = 0
        """decoding steps taken (one forward each), for throughput accounting."""
        self.rows_computed = 0
        """sum over steps of the batch rows computed."""
        self.host_reads = 0
        """times the decoder read the device's results on the host (a synchronisation each
        on an accelerator)."""
        self.rewinds = 0
        """times the full buffer was shifted back."""

    def _new_cache(self, longest_cap: int) -> tuple[SlotCache, torch.Tensor]:
        """A cache at the floor, and ``arange(capacity)``.

        Its room: the floor, a row's longest continuation and the headroom of ``host_every``
        steps.
        """
        capacity = self._floor + longest_cap + max(16, longest_cap // 4, self.host_every)
        cache = SlotCache(self.model.config.get_text_config().num_hidden_layers, capacity,
                          static_on=self.device if self.static_shapes else None)
        cache.set_column(self._floor)
        return cache, torch.arange(capacity, device=self.device)

    def _decode(self, cache: SlotCache, rows: DeviceRows, step: Callable[[], None],
                collect: Callable[[], Iterator]) -> Iterator:
        """Step ``host_every`` times, then let ``collect`` read and refill; until all rows idle.

        Args:
            cache: the cache.
            rows: the rows, started.
            step: one decoding step (device work only).
            collect: the host's look: yields what ended and refills rows.
        """
        if self.cuda_graph:
            step = _captured(step, rows.tensors() + [cache.column_tensor], self.device)
        while True:
            if cache.column + self.host_every > cache.capacity:
                self._rewind(cache, rows)
            for _ in range(self.host_every):
                step()
                self._count_step(cache, len(rows.ids))
            yield from collect()
            if all(row_id is None for row_id in rows.ids):
                return
            if not self.static_shapes:
                self._drop_idle_rows(cache, rows)

    def _forward(self, cache: SlotCache, rows: DeviceRows, columns: torch.Tensor
                 ) -> torch.Tensor:
        """One decoding step's forward: every row feeds its token at the cache's write column.

        Device work only, so a CUDA graph can capture it. A static cache's device column moves
        on by one here; the host's, in :meth:`_count_step`. A row that ended (or is idle) feeds
        at position 0: decoding on past its cap, its position would leave the model's context
        (an index out of range for learned position embeddings).

        Args:
            cache: the cache, its write column at this step.
            rows: the rows (their next tokens, starts and ends).
            columns: ``arange(capacity)`` on the device.

        Returns:
            [rows, model vocab] next-token logits.
        """
        static = cache.column_tensor is not None
        column = cache.column_tensor if static else cache.column
        visible = columns if static else columns[: cache.column + 1]
        positions = torch.where(rows.done, 0, column - rows.start)
        logits = self.model(input_ids=rows.next_input.unsqueeze(1),
                            attention_mask=self._mask(rows.start, visible, column),
                            position_ids=positions.unsqueeze(1),
                            use_cache=True, **{self._cache_argument: cache}).logits[:, -1]
        if static:
            cache.column_tensor.add_(1)
        return logits

    def _count_step(self, cache: SlotCache, rows: int) -> None:
        """The host's side of one step: the write column moves on, the step is counted."""
        cache.column += 1
        self.steps += 1
        self.rows_computed += rows

    def _mask(self, start: torch.Tensor, columns: torch.Tensor,
              column: int | torch.Tensor) -> torch.Tensor:
        """The 4D mask [rows, 1, 1, columns] hiding from each row the columns before its start.

        Additive, so eager attention (which adds the mask) and SDPA read it alike. With a
        static cache (``column`` a device tensor) it also hides the columns past the write one.
        """
        hidden = columns.unsqueeze(0) < start.unsqueeze(1)
        if isinstance(column, torch.Tensor):
            hidden |= columns.unsqueeze(0) > column
        mask = torch.zeros(hidden.shape, dtype=self.mask_dtype, device=self.device)
        return mask.masked_fill_(hidden, torch.finfo(self.mask_dtype).min)[:, None, None, :]

    @staticmethod
    def _advance(rows: DeviceRows, drawn: torch.Tensor, logprobs: torch.Tensor | None,
                 drawable: torch.Tensor | None, end_ids: torch.Tensor | None) -> None:
        """Each live row takes its drawn token, on the device: its length, end, tokens.

        Args:
            rows: the rows.
            drawn: [rows] this step's tokens.
            logprobs: [rows] their log-probabilities, to record; None records none.
            drawable: [rows] False where a draw had no finite weight; None: all could be.
            end_ids: the ids that end a row; None: only its cap does.
        """
        live = ~rows.done
        if drawable is not None:
            rows.failed |= live & ~drawable
        column = torch.where(live, rows.length, rows.tokens.shape[1] - 1).unsqueeze(1)
        rows.tokens.scatter_(1, column, drawn.unsqueeze(1))
        if logprobs is not None:
            rows.logprobs.scatter_(1, column, logprobs.unsqueeze(1))
        ended = rows.length + 1 >= rows.cap
        if end_ids is not None:  # not torch.isin: with many ids it sorts, and syncs on CUDA
            on_eos = live & (drawn.unsqueeze(1) == end_ids).any(dim=1)
            rows.on_eos |= on_eos
            ended |= on_eos
        rows.length += live
        rows.done |= live & ended
        rows.next_input.copy_(drawn)

    def _read(self, rows: DeviceRows, logprobs: bool = False) -> RowsRead:
        """Read the rows on the host, in one transfer; refuse a non-finite draw in one line.

        Args:
            rows: the rows.
            logprobs: read the log-probabilities too.
        """
        fields = torch.stack([rows.done, rows.on_eos, rows.failed, rows.length], dim=1).long()
        packed = [fields, rows.tokens]
        if logprobs:
            packed.append(rows.logprobs.view(torch.int64))  # the float64 bits, in the same read
        host = torch.cat(packed, dim=1).cpu().numpy()
        self.host_reads += 1
        if host[:, 2].any():
            raise SelftrainError(NOT_FINITE)
        width = rows.tokens.shape[1]
        return RowsRead(done=host[:, 0].astype(bool), on_eos=host[:, 1].astype(bool),
                        length=host[:, 3], tokens=host[:, 4: 4 + width],
                        logprobs=host[:, 4 + width:].view(np.float64) if logprobs else None)

    def _rewind(self, cache: SlotCache, rows: DeviceRows) -> None:
        """Shift the live window of the cache back, keeping the write column >= the floor.

        The starts are the host's own, so this reads nothing from the device.
        """
        origin = min(min(rows.starts), cache.column - self._floor)
        cache.shift(origin)
        rows.start -= origin
        rows.starts = [start - origin for start in rows.starts]
        self.rewinds += 1

    def _drop_idle_rows(self, cache: SlotCache, rows: DeviceRows) -> None:
        """Once a quarter of the rows are idle (no ids left), stop computing them."""
        keep = [b for b, row_id in enumerate(rows.ids) if row_id is not None]
        idle = len(rows.ids) - len(keep)
        if idle and 4 * idle >= len(rows.ids):
            cache.keep_rows(torch.tensor(keep, device=self.device))
            rows.keep(keep)


def _captured(step: Callable[[], None], state: list[torch.Tensor], device: torch.device
              ) -> Callable[[], None]:
    """``step`` captured as a CUDA graph on the model's device: returns its replay.

    Warm-up steps on a side stream (as CUDA graphs require) change the decoding state, so it is
    saved before and put back after; the cache columns they wrote are written again before any
    row can see them. Streams and capture follow the current CUDA device, so all of it runs
    with the model's made current (a model on ``cuda:1`` would otherwise leave an empty graph).

    Args:
        step: one decoding step, device work only, on static shapes.
        state: every tensor the step changes besides the cache's buffers.
        device: the model's device.
    """
    with torch.cuda.device(device):
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

    def replay() -> None:
        with torch.cuda.device(device):
            graph.replay()

    return replay
