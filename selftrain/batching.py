"""Length-grouped, deterministic, rank-aware, resumable batching.

BOS-sampled corpora mix sequences that stop early (EOS) with ones cut at ``max_new_tokens``;
padding a random batch to its longest row wastes compute. Each epoch the indices are shuffled
with ``(seed, epoch)``, cut into mega-groups of ``group_batches`` batches, sorted by length
inside a group, split into batches, and the batch order shuffled again. The plan is the same on
every rank; rank r takes batches r, r + W, r + 2W, ... of it, so DDP needs no sampler of
Lightning's and every rank has the same number of steps.

The loader is resumable: Lightning stores its ``state_dict`` in every checkpoint, and a run
resumed from a mid-epoch checkpoint skips the batches it already trained on, so it ends at
the same global step as an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Yields lists of row indices, grouped by length, one rank's share of each epoch.

    Args:
        lengths: token count of every row.
        batch_size: rows per batch (per rank).
        seed: shuffling seed; the plan of an epoch depends only on (seed, epoch).
        shuffle: shuffle rows and batches each epoch; False keeps corpus order.
        group_batches: batches per length-sorted mega-group; larger packs tighter but mixes
            less. 0 sorts the whole epoch by length.
        rank: this process's rank.
        world_size: number of processes sharing the epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0,
                 shuffle: bool = True, group_batches: int = 64, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_batches = group_batches
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan ``__iter__`` yields."""
        self.epoch = epoch

    def global_plan(self, epoch: int | None = None) -> list[np.ndarray]:
        """All batches of an epoch, across ranks, truncated to a multiple of the world size."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(
            len(self.lengths))
        group = max(len(order), 1) if self.group_batches <= 0 else (
            self.group_batches * self.batch_size)
        batches: list[np.ndarray] = []
        for start in range(0, len(order), group):
            chunk = order[start:start + group]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i:i + self.batch_size] for i in range(0, len(chunk),
                                                                      self.batch_size))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        usable = len(batches) // self.world_size * self.world_size
        return batches[:usable]

    def real_token_fraction(self, epoch: int | None = None) -> float:
        """Share of real (non-padding) tokens over an epoch's padded batches."""
        plan = self.global_plan(epoch)
        real = sum(int(self.lengths[b].sum()) for b in plan)
        padded = sum(int(self.lengths[b].max()) * len(b) for b in plan)
        return real / max(padded, 1)

    def __len__(self) -> int:
        full = -(-len(self.lengths) // self.batch_size)
        return full // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.global_plan()[self.rank::self.world_size]
        skip, self.skip_batches = self.skip_batches, 0
        for batch in plan[skip:]:
            yield batch.tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader that knows the trainer's epoch and whose position survives a checkpoint.

    Lightning calls ``set_epoch`` only on a batch sampler's inner ``sampler``, so the epoch is
    read from ``progress`` when iteration starts instead.

    Args:
        dataset: the rows.
        batch_sampler: a :class:`LengthGroupedBatchSampler`.
        progress: returns ``(epoch, batches finished in it)`` from the trainer, or None when
            used without one (then call ``batch_sampler.set_epoch`` yourself).
        **kwargs: passed to :class:`torch.utils.data.DataLoader`.
    """

    def __init__(self, dataset: Dataset, batch_sampler: LengthGroupedBatchSampler,
                 progress: Callable[[], tuple[int, int] | None], **kwargs: Any) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._progress = progress
        self._resume: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        """The epoch being iterated and how many of its batches the trainer has finished."""
        progress = self._progress()
        done = progress[1] if progress is not None else 0
        return {"epoch": self.batch_sampler.epoch, "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Remember where to resume; applied when the same epoch is iterated next."""
        self._resume = dict(state)

    def __iter__(self):
        sampler = self.batch_sampler
        progress = self._progress()
        if progress is not None:
            sampler.set_epoch(progress[0])
        if self._resume is not None:
            if self._resume["epoch"] == sampler.epoch:
                sampler.skip_batches = self._resume["batches_done"]
            self._resume = None
        return super().__iter__()


def pad_collate(rows: list[dict[str, Any]], pad_id: int, pad_to_multiple_of: int = 1
                ) -> dict[str, torch.Tensor]:
    """Right-pad rows of ``input_ids``; labels are -100 on padding so loss sees real tokens only.

    Args:
        rows: dicts with an ``input_ids`` list.
        pad_id: id written into padding positions (masked out anyway).
        pad_to_multiple_of: round the padded length up to this multiple.
    """
    longest = max(len(row["input_ids"]) for row in rows)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
