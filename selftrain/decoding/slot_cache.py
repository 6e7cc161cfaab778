"""The KV cache of the BOS sampler: fixed capacity, one shared write column per step.

Every row of the sampler feeds exactly one token a step, so all rows write their new key/value
at the same cache column. A refilled row starts at the current column (the sampler's 4D mask
hides the columns before its start); when the buffer is full, the sampler shifts the live window
back to column 0, and once no ids are left it drops finished rows. The prompted decoder
(:mod:`.prompted`) also writes a row's prefilled prompt into the columns just before the write
column (:meth:`SlotCache.write_row`). The transformers ``Cache`` API is implemented only as far
as decoder layers call it.

A *static* cache keeps every shape fixed for a CUDA graph: the write column is also a device
tensor (:attr:`SlotCache.column_tensor`), keys and values are written there in place and every
step attends over the whole buffer, the decoder's mask hiding the columns past the write column.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _SlotLayer(CacheLayerMixin):
    """One layer's key/value buffer [rows, heads, columns, head_dim], written one column a step."""

    is_compileable = False

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.keys, self.values = (
            states.new_zeros((*states.shape[:2], self.owner.capacity, states.shape[-1]))
            for states in (key_states, value_states))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.owner.column_tensor is not None:
            self.keys.index_copy_(2, self.owner.column_tensor, key_states[:, :, -1:])
            self.values.index_copy_(2, self.owner.column_tensor, value_states[:, :, -1:])
            return self.keys, self.values
        column = self.owner.column
        self.keys[:, :, column] = key_states[:, :, -1]
        self.values[:, :, column] = value_states[:, :, -1]
        return self.keys[:, :, : column + 1], self.values[:, :, : column + 1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.owner.column_tensor is not None:
            return self.owner.capacity, 0
        return self.owner.column + 1, 0

    def get_seq_length(self) -> int:
        return self.owner.column

    def get_max_length(self) -> int:
        return self.owner.capacity


class SlotCache(Cache):
    """KV cache for :class:`BosSampler`: fixed capacity, one shared write column per step.

    Args:
        num_layers: decoder layers of the model.
        capacity: columns per layer buffer (``max_new_tokens`` plus headroom).
        static_on: a device for a static cache (every step writes at :attr:`column_tensor`
            and returns the whole buffer); None for one that returns the columns so far.
    """

    def __init__(self, num_layers: int, capacity: int, static_on: torch.device | None = None):
        self.capacity = capacity
        self.column = 0
        self.column_tensor = (None if static_on is None else
                              torch.zeros(1, dtype=torch.long, device=static_on))
        """static: [1] the write column on the device, advanced by the step itself."""
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    def set_column(self, column: int) -> None:
        """Move the write column (and, when static, its device copy) to ``column``."""
        self.column = column
        if self.column_tensor is not None:
            self.column_tensor.fill_(column)

    def shift(self, origin: int) -> None:
        """Move columns [origin, column) to the front; the write column moves back by origin."""
        live = self.column - origin
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[:, :, :live] = layer.keys[:, :, origin: self.column].clone()
                layer.values[:, :, :live] = layer.values[:, :, origin: self.column].clone()
        self.set_column(live)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (drops finished rows once no ids are left)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys = layer.keys.index_select(0, rows)
                layer.values = layer.values.index_select(0, rows)

    def write_row(self, row: int, rows: int, keys: list[torch.Tensor],
                  values: list[torch.Tensor]) -> None:
        """Write one row's prefilled keys and values into the columns just before the write one.

        Args:
            row: the batch row to write.
            rows: the batch rows, to allocate uninitialized layer buffers for.
            keys: per layer, [1, heads, length, head_dim] keys (length <= the write column).
            values: per layer, the values alike.
        """
        for layer, key, value in zip(self.layers, keys, values, strict=True):
            if not layer.is_initialized:
                layer.keys, layer.values = (
                    states.new_zeros((rows, states.shape[1], self.capacity, states.shape[-1]))
                    for states in (key, value))
                layer.is_initialized = True
            length = key.shape[2]
            layer.keys[row, :, self.column - length: self.column] = key[0]
            layer.values[row, :, self.column - length: self.column] = value[0]
