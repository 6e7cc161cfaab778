"""Padding-free packing: a batch's documents concatenated into one row.

A length-grouped padded batch still spends compute on padding, and the last rows of a group
pad the most. Packing puts the same documents end to end in a single ``1 x sum(lengths)`` row
with no padding at all. What keeps the documents apart is ``position_ids`` restarting at 0 at
every document start, with no ``attention_mask``:

* ``sdpa``, ``eager`` and ``flex_attention``: transformers' ``masking_utils.create_causal_mask``
  finds the restarts (``find_packed_sequence_indices``) and builds a block-diagonal causal mask;
* ``flash_attention_2`` / ``flash_attention_3``: the flash integration turns the restarts into
  ``cu_seqlens`` and calls the varlen kernel.

Both need the model's modeling code to be transformers' current mask and attention path; a
model with its own mask logic (typically remote code) would let every document attend to the
ones before it, silently. :func:`packing_supported` checks that, and
:class:`selftrain.training.data.CorpusDataModule` falls back to padding where it fails.

The targets are the padded batch's: every token but each document's first is predicted from
the tokens of its own document, so the loss, the logits and the gradients match the padded
batch's (tests/test_packing.py checks all three on every tiny family). Training must run
without a KV cache (``use_cache=False``, as :class:`selftrain.training.module.StudentLM` calls the
model): with a cache transformers skips the packed-sequence detection.

Cost: flash attention's varlen kernel only computes the diagonal blocks, so packing saves all
the padding's compute. ``sdpa`` and ``eager`` instead get one dense ``sum x sum`` mask over the
packed row, so attention grows with the square of the packed length: on CPU, tiny:qwen2 on the
debug corpus (98% real tokens padded, batch 8) trains 1.5x (sdpa) to 2.5x (eager) slower
packed. There packing pays only where padding is heavy.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
"""Attention implementations whose transformers integration keeps packed documents apart."""


def pack_collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Concatenate rows of ``input_ids`` into one row, documents kept apart by position ids.

    Args:
        rows: dicts with an ``input_ids`` list (the rows a padded batch would hold), and
            optionally ``loss_from`` (as :func:`selftrain.training.batching.pad_collate`).

    Returns:
        ``input_ids``, ``position_ids`` (0..len-1 per document) and ``labels`` (the ids, with
        -100 at every document's first token, so no document is trained to predict the next
        one's BOS, and before a row's ``loss_from``), each of shape ``1 x sum(lengths)``; no
        ``attention_mask``.
    """
    ids = [torch.as_tensor(row["input_ids"], dtype=torch.long) for row in rows]
    input_ids = torch.cat(ids).unsqueeze(0)
    position_ids = torch.cat([torch.arange(len(row)) for row in ids]).unsqueeze(0)
    first_target = torch.cat([torch.full((len(tokens),), max(row.get("loss_from", 1), 1))
                              for row, tokens in zip(rows, ids, strict=True)]).unsqueeze(0)
    labels = input_ids.masked_fill(position_ids < first_target, -100)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def packing_support(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether packed rows keep documents apart in this model, and why (or why not).

    Args:
        model: a transformers causal LM (possibly wrapped by a subclass, e.g. FSDP's).

    Returns:
        (supported, reason): supported when the attention implementation is one of
        :data:`PACKED_ATTENTION` and the model's modeling code (the module of its class, of a
        base class, or of its base model's class) builds masks with transformers'
        ``masking_utils.create_causal_mask``.
    """
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in PACKED_ATTENTION:
        return False, (f"attention implementation {implementation!r} is not one of "
                       f"{', '.join(PACKED_ATTENTION)}")
    classes = [*type(model).__mro__]
    base = getattr(model, "base_model", None)
    if isinstance(base, torch.nn.Module) and base is not model:
        classes.extend(type(base).__mro__)
    for cls in classes:
        module = sys.modules.get(cls.__module__)
        builder = getattr(module, "create_causal_mask", None)
        if getattr(builder, "__module__", None) == "transformers.masking_utils":
            return True, (f"{implementation} with {cls.__module__}: masks from position ids "
                          "(transformers.masking_utils)")
    return False, (f"{type(model).__name__} ({type(model).__module__}) builds its attention "
                   "masks without transformers.masking_utils.create_causal_mask, so position "
                   "ids would not keep packed documents apart")


def packing_supported(model: torch.nn.Module) -> bool:
    """Whether packed rows keep documents apart in this model (see :func:`packing_support`).

    Args:
        model: a transformers causal LM.
    """
    return packing_support(model)[0]
