"""selftrain.training.batching: length-grouped, deterministic, rank-aware, resumable batches."""

import numpy as np
import pytest

from selftrain.training.batching import LengthGroupedBatchSampler, pad_collate


def bos_like_lengths(n=2000, cap=257, seed=0):
    """Like a BOS-sampled corpus: most rows hit the cap, the rest stop early at random."""
    rng = np.random.default_rng(seed)
    early = rng.integers(2, cap, size=n)
    return np.where(rng.random(n) < 0.6, cap, early).tolist()


def test_length_grouping_keeps_padding_low():
    lengths = bos_like_lengths()
    grouped = LengthGroupedBatchSampler(lengths, batch_size=16, group_batches=64)
    plain = LengthGroupedBatchSampler(lengths, batch_size=16, group_batches=1)
    assert grouped.real_token_fraction() >= 0.95
    assert plain.real_token_fraction() < 0.85  # what random batches would waste


def test_plan_is_deterministic_per_epoch_and_covers_every_row():
    lengths = bos_like_lengths(500)
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=1)
    again = LengthGroupedBatchSampler(lengths, batch_size=8, seed=1)
    epoch0 = [b.tolist() for b in sampler.global_plan(0)]
    assert epoch0 == [b.tolist() for b in again.global_plan(0)]
    assert epoch0 != [b.tolist() for b in sampler.global_plan(1)]
    assert sorted(i for b in epoch0 for i in b) == list(range(500))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_equal_shares(world):
    lengths = bos_like_lengths(301)
    shares = []
    for rank in range(world):
        sampler = LengthGroupedBatchSampler(lengths, batch_size=4, rank=rank, world_size=world)
        sampler.set_epoch(2)
        shares.append(list(sampler))
        assert len(shares[-1]) == len(sampler)
    assert len({len(s) for s in shares}) == 1
    seen = [i for share in shares for batch in share for i in batch]
    assert len(seen) == len(set(seen))


def test_position_is_read_lazily_and_skips_trained_batches():
    lengths = bos_like_lengths(80, cap=20)
    position = {"epoch": 1, "skip": 0}
    sampler = LengthGroupedBatchSampler(lengths, batch_size=4,
                                        position=lambda: (position["epoch"], position["skip"]))
    full = list(sampler)
    assert sampler.epoch == 1
    pending = iter(sampler)  # created before a checkpoint is restored, as Lightning does
    position["skip"] = 7
    assert list(pending) == full[7:]
    position.update(epoch=2, skip=0)
    assert list(sampler) != full and sampler.epoch == 2


def test_pad_collate_masks_padding_out_of_the_loss():
    batch = pad_collate([{"input_ids": [5, 6, 7]}, {"input_ids": [5, 6]}], pad_id=0,
                        pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["labels"].tolist() == [[5, 6, 7, -100], [5, 6, -100, -100]]
    assert batch["attention_mask"].sum().item() == 5
