"""Per-row probe values gathered over ranks, exactly, and their per-domain summaries.

Probe rows are sharded over ranks (rank r takes rows r, r + W, ...). :class:`RowResults` keeps,
per rank, the row ids it evaluated and a value per row; ``compute()`` writes them into a
``[num_rows]`` vector (``[num_rows, width]`` for several values per row) that is zero elsewhere
and sums the vectors over ranks with one
``torch.distributed`` all-reduce (with a per-row count beside them). The shards are disjoint, so
each value is added to zeros only and arrives unchanged: every rank gets every value in row
order. Per-domain summaries are then plain functions of the full vector, so a mean is never a
mean of per-rank means and a count is never counted twice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RowResults:
    """Per-row values gathered over ranks and returned in row order.

    Args:
        num_rows: rows in the whole probe set (all ranks together).
        width: values per row; 1 gives ``[num_rows]`` results, more ``[num_rows, width]``
            (several measurements of one pass gathered in one all-reduce).
    """

    def __init__(self, num_rows: int, width: int = 1) -> None:
        if width < 1:
            raise ValueError(f"RowResults width {width}: must be >= 1")
        self.num_rows = num_rows
        self.width = width
        self.device = torch.device("cpu")
        self.rows: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def to(self, device: torch.device | str) -> RowResults:
        """Keep the state (and do the all-reduce) on ``device``; returns self.

        Args:
            device: the student's device (a CUDA device under NCCL).
        """
        self.device = torch.device(device)
        self.rows = [rows.to(self.device) for rows in self.rows]
        self.values = [values.to(self.device) for values in self.values]
        return self

    def reset(self) -> None:
        """Forget the recorded rows (before the next evaluation)."""
        self.rows, self.values = [], []

    def update(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Record values for some rows.

        Every rank must call ``compute`` once per evaluation (with nothing recorded if its
        shard is empty), or the all-reduce in it waits forever.

        Args:
            rows: ``[n]`` row indices (long).
            values: ``[n]`` values (float64), ``[n, width]`` when ``width > 1``.
        """
        self.rows.append(rows.to(self.device, torch.long))
        self.values.append(values.to(self.device, torch.float64))

    def compute(self) -> torch.Tensor:
        """``[num_rows]`` (or ``[num_rows, width]``) float64 values in row order, on the CPU.

        A collective: every rank calls it.

        Raises:
            RuntimeError: a row was evaluated on no rank, or on more than one.
        """
        table = torch.zeros((self.width + 1, self.num_rows), dtype=torch.float64,
                            device=self.device)
        if self.rows:
            rows = torch.cat(self.rows)
            values = torch.cat(self.values).reshape(len(rows), self.width)
            table[: self.width, rows] = values.T
            table[self.width, rows] = 1.0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(table)
        table = table.cpu()
        values, seen = table[: self.width], table[self.width]
        if not bool((seen > 0).all()):
            raise RuntimeError(f"RowResults: {int((seen == 0).sum())} of {self.num_rows} rows "
                               "were not evaluated on any rank")
        if bool((seen > 1).any()):
            raise RuntimeError(f"RowResults: {int((seen > 1).sum())} of {self.num_rows} rows "
                               "were evaluated on more than one rank; shard them with "
                               "shard_rows")
        return values[0] if self.width == 1 else values.T.contiguous()


def per_domain(values: torch.Tensor, domain_index: torch.Tensor, num_domains: int,
               reduce: str = "mean") -> torch.Tensor:
    """Sum or mean of per-row values within each domain.

    Args:
        values: ``[N]`` per-row values.
        domain_index: ``[N]`` domain of each row.
        num_domains: D.
        reduce: ``sum`` or ``mean``.

    Returns:
        ``[D]`` float64.
    """
    sums = torch.zeros(num_domains, dtype=torch.float64).index_add_(
        0, domain_index, values.double())
    if reduce == "sum":
        return sums
    counts = torch.bincount(domain_index, minlength=num_domains).double()
    return sums / counts.clamp(min=1)
