"""selftrain.probes.metrics: RowResults puts per-row values back in row order, over gloo too."""

import os

import pytest
import torch

from selftrain.probes.metrics import RowResults, per_domain
from selftrain.probes.windows import shard_rows


def test_row_results_put_values_in_row_order_and_per_domain_reduces():
    metric = RowResults(5)
    metric.update(torch.tensor([4, 0]), torch.tensor([1.5, -2.0], dtype=torch.float64))
    metric.update(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.float64))
    metric.update(torch.tensor([2, 1, 3]), torch.tensor([0.25, 3.0, 7.0], dtype=torch.float64))
    values = metric.compute()
    assert values.tolist() == [-2.0, 3.0, 0.25, 7.0, 1.5] and values.dtype == torch.float64
    domains = torch.tensor([1, 0, 1, 1, 0])
    assert per_domain(values, domains, 3).tolist() == [2.25, (-2.0 + 0.25 + 7.0) / 3, 0.0]
    assert per_domain(values, domains, 3, reduce="sum").tolist() == [4.5, 5.25, 0.0]
    metric.reset()
    metric.update(torch.tensor([0, 1]), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="3 of 5 rows were not evaluated"):
        metric.compute()
    single = RowResults(1)  # torchmetrics squeezes 1-element results; a row vector stays one
    single.update(torch.tensor([0]), torch.tensor([4.0], dtype=torch.float64))
    assert single.compute().shape == (1,)


def _gather_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        results = {}
        for count in (5, 1, 4):  # uneven shards, an empty shard on rank 1, even shards
            metric = RowResults(count)
            rows = shard_rows(count, rank, world)
            for part in (rows[:1], rows[1:]):  # two updates: the second may be empty
                metric.update(part, part.double() * 10 + 0.5)
            results[count] = metric.compute().tolist()
            metric.reset()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_row_results_gather_the_full_vector_on_every_rank_under_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2,
             join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for count, values in results.items():
            assert values == [i * 10 + 0.5 for i in range(count)], (rank, count)
