"""torchmetrics objects for the probes, so the DDP reduction is torchmetrics' and is exact.

Probe rows are sharded over ranks (rank r takes rows r, r + W, ...). :class:`RowResults`
keeps, per rank, the row ids it evaluated and a value per row; ``compute()`` gathers every
rank's rows (torchmetrics' ``cat`` reduction pads uneven shards) and returns the values in
row order, identical on every rank. Per-domain summaries are then plain functions of the full
vector, so a mean is never a mean of per-rank means and a count is never counted twice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class RowResults(Metric):
    """Per-row values gathered over ranks and returned in row order.

    Args:
        num_rows: rows in the whole probe set (all ranks together).
    """

    full_state_update = False

    def __init__(self, num_rows: int) -> None:
        super().__init__()
        self.num_rows = num_rows
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Record values for some rows.

        Every rank must call it at least once per evaluation (with empty tensors if its shard
        is empty), or the gather in ``compute`` waits forever.

        Args:
            rows: ``[n]`` row indices (long).
            values: ``[n]`` values (float64).
        """
        self.rows.append(rows.to(self.device, torch.long))
        self.values.append(values.to(self.device, torch.float64))

    def _wrap_compute(self, compute: Callable) -> Callable:
        """Wrap compute as torchmetrics does (sync, cache) but keep a 1-row result a vector.

        torchmetrics squeezes a one-element output to a 0-d tensor; a one-row probe set
        must still give a ``[1]`` vector.
        """
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def keep_shape(*args, **kwargs) -> torch.Tensor:
            return wrapped(*args, **kwargs).reshape(self.num_rows)

        return keep_shape

    def compute(self) -> torch.Tensor:
        """``[num_rows]`` float64 values in row order (NaN-free only if every row was seen)."""
        rows = _cat(self.rows, torch.long)
        values = _cat(self.values, torch.float64)
        out = torch.full((self.num_rows,), float("nan"), dtype=torch.float64)
        out[rows.cpu()] = values.cpu()
        seen = torch.zeros(self.num_rows, dtype=torch.bool)
        seen[rows.cpu()] = True
        if not bool(seen.all()):
            raise RuntimeError(f"RowResults: {int((~seen).sum())} of {self.num_rows} rows "
                               "were not evaluated on any rank")
        return out


def _cat(state: list[torch.Tensor] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A state as one tensor (after a sync it may already be one)."""
    if isinstance(state, list) and not state:
        return torch.zeros(0, dtype=dtype)
    return dim_zero_cat(state)


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
