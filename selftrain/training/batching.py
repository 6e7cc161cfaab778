"""Length-grouped, deterministic, rank-aware, resumable batching.

BOS-sampled corpora mix sequences that stop early (EOS) with ones cut at ``max_new_tokens``;
padding a random batch to its longest row wastes compute. Each epoch the indices are shuffled
with ``(seed, epoch)``, cut into mega-groups of ``group_batches`` batches, sorted by length
inside a group, split into batches, and the batch order shuffled again. The plan is the same on
every rank; rank r takes batches r, r + W, r + 2W, ... of it, so DDP needs no sampler of
Lightning's and every rank has the same number of steps.

Resuming mid-epoch: the sampler asks a ``position`` callable for (epoch, batches to skip)
when iteration actually starts (the first ``next``), not when the iterator is created. Lightning
creates the training iterator before it restores a checkpoint, so only a lazy read sees the
restored epoch and position; :class:`selftrain.training.data.CorpusDataModule` supplies both.

A batch is padded (:func:`pad_collate`) or packed (:mod:`selftrain.training.packing`);
:func:`real_tokens` and :func:`documents` count either kind the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler


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
        position: called when iteration starts; returns (epoch, batches of this rank's share
            to skip). None uses :meth:`set_epoch` and skips nothing.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0,
                 shuffle: bool = True, group_batches: int = 64, rank: int = 0,
                 world_size: int = 1,
                 position: Callable[[], tuple[int, int]] | None = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_batches = group_batches
        self.rank = rank
        self.world_size = world_size
        self.position = position
        self.epoch = 0

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
        skip = 0
        if self.position is not None:
            self.epoch, skip = self.position()
        plan = self.global_plan()[self.rank::self.world_size]
        for batch in plan[skip:]:
            yield batch.tolist()


def pad_collate(rows: list[dict[str, Any]], pad_id: int, pad_to_multiple_of: int = 1
                ) -> dict[str, torch.Tensor]:
    """Right-pad rows of ``input_ids``; labels are -100 on padding so loss sees real tokens only.

    A row with ``loss_from`` p (a synthesizer's ``d1 SEP d2`` row) also has labels -100 before
    position p, so only its tokens from p on are trained on.

    Args:
        rows: dicts with an ``input_ids`` list (and optionally ``loss_from``).
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
    for i, row in enumerate(rows):
        labels[i, : row.get("loss_from", 0)] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "labels")
"""Keys of a training batch the model is called with (padded or packed)."""


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Real (non-padding) tokens in a padded or packed batch, as a float scalar tensor."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum().float()
    return torch.tensor(float(batch["input_ids"].numel()), device=batch["input_ids"].device)


def documents(batch: dict[str, torch.Tensor]) -> int:
    """Documents in a padded batch (its rows) or a packed one (its position-0 tokens)."""
    if "attention_mask" in batch or "position_ids" not in batch:
        return batch["input_ids"].shape[0]
    return int((batch["position_ids"] == 0).sum())
