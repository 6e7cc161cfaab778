"""The student's next-token loss through the LM head a chunk of tokens at a time.

transformers' causal-LM forward computes the logits of every position at once and upcasts them
to float32 for its loss: batch x sequence x vocabulary x 4 bytes, 2.5 GB for one 8 x 512 batch
of Qwen2.5 (151,936 tokens), held until backward with their gradient beside them. That caps
the batch on a GPU long before the backbone does. Here the backbone runs as usual; then only
the positions that have a target go through the head, ``chunk`` of them at a time, each chunk's
logits computed, upcast, reduced to a cross-entropy sum and dropped, and computed again in
backward (a non-reentrant checkpoint per chunk). The loss's peak memory is one chunk's logits,
whatever the batch.

The arithmetic is transformers' ``ForCausalLMLoss``: labels shifted left by one (the last
position and labels -100 have no target), the head's logits transformed as the family's own
forward does (:func:`transform_logits`), upcast to float32, summed cross-entropy divided by
the number of targets. Packed batches (``position_ids`` instead of ``attention_mask``) go
through the backbone exactly as they go through the whole model. Tied embeddings get their
gradient through the head, which is the same tensor.

On CUDA, Liger's fused linear cross-entropy kernel (``pip install 'selftrain[liger]'``) does
the same in one fused pass where it is importable and the family's logits need at most a
soft cap; the chunked torch path is the reference and the fallback everywhere else.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from selftrain.errors import SelftrainError

IGNORE = -100
"""The label of a position without a target (padding, a document's first token)."""

LossKernel = Literal["auto", "torch", "liger"]
"""``--model.loss_kernel``: how a chunked loss is computed."""

SCALED_LOGITS = (("logit_scale", "Cohere"), ("logits_scaling", "Granite"))
"""Config fields of families that scale their logits (Liger's kernel cannot)."""


def transform_logits(logits: torch.Tensor, config) -> torch.Tensor:
    """The head's logits as the family's forward hands them to its loss.

    Cohere multiplies them by ``logit_scale``, Granite divides them by ``logits_scaling`` and
    Gemma 2/3 soft-cap them (``tanh(logits / cap) * cap`` with ``final_logit_softcapping``),
    in the forward's own order and dtype; other families leave them alone.

    Args:
        logits: ``[tokens, vocab]`` output of the LM head, in the head's dtype.
        config: the student's transformers config.
    """
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        logits = logits / scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def targets_of(labels: torch.Tensor) -> torch.Tensor:
    """Each position's target: the next position's label, -100 at the end (as transformers).

    Args:
        labels: ``[batch, seq]`` labels, -100 where nothing is predicted.

    Returns:
        ``[batch, seq]`` targets.
    """
    return nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:]


def liger_available() -> bool:
    """Whether Liger's kernels can be imported (a CUDA build of torch with Triton)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception:  # noqa: BLE001 - Triton or CUDA missing: not usable here
        return False
    return True


def check_loss_flags(chunk: int | None, kernel: LossKernel) -> None:
    """Refuse a chunk size below 1 and a Liger kernel that is not installed.

    Args:
        chunk: ``--model.loss_chunk``.
        kernel: ``--model.loss_kernel``.
    """
    if chunk is not None and chunk < 1:
        raise SelftrainError(f"--model.loss_chunk {chunk}: must be >= 1 (tokens per chunk of "
                             "the LM head, e.g. 1024), or unset for transformers' own loss")
    if kernel == "liger" and chunk is None:
        raise SelftrainError("--model.loss_kernel liger: set --model.loss_chunk too (e.g. 1024); "
                             "without it the loss is transformers' own")
    if kernel == "liger" and importlib.util.find_spec("liger_kernel") is None:
        raise SelftrainError("--model.loss_kernel liger: liger-kernel is not installed "
                             "(pip install 'selftrain[liger]' on a CUDA machine); or use "
                             "--model.loss_kernel auto")


def uses_liger(kernel: LossKernel, device: torch.device, config) -> bool:
    """Whether a chunked loss on ``device`` goes through Liger's fused kernel.

    Args:
        kernel: ``--model.loss_kernel``.
        device: where the student's weights are.
        config: the student's config: a family that scales its logits stays on torch.

    Raises:
        SelftrainError: ``liger`` asked for where it cannot run.
    """
    if kernel == "torch":
        return False
    scaled = [family for field, family in SCALED_LOGITS if getattr(config, field, None)
              is not None]
    usable = device.type == "cuda" and not scaled and liger_available()
    if kernel == "liger" and not usable:
        why = (f"{scaled[0]}'s logit scaling is not in Liger's kernel" if scaled
               else f"it needs a CUDA GPU with Triton, not {device.type}")
        raise SelftrainError(f"--model.loss_kernel liger: {why}; use --model.loss_kernel torch "
                             "(the chunked loss in torch) or auto")
    return usable


def _chunk_nll(head: nn.Module, config, hidden: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
    """Summed float32 cross-entropy of one chunk of positions (recomputed in backward)."""
    logits = transform_logits(head(hidden), config).float()
    return nn.functional.cross_entropy(logits, targets, reduction="sum")


def chunked_nll(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int,
                config=None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden`` through ``head``, ``chunk`` rows at a time.

    Args:
        hidden: ``[tokens, hidden]`` final hidden states of positions that have a target.
        head: the LM head (``model.get_output_embeddings()``).
        targets: ``[tokens]`` their target ids.
        chunk: rows per chunk; one chunk's logits is all the loss ever holds.
        config: the student's config, for :func:`transform_logits`.

    Returns:
        The float32 sum over all rows (0 for no rows).
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_nll, head, config, hidden[rows], targets[rows],
                              use_reentrant=False)
        else:
            part = _chunk_nll(head, config, hidden[rows], targets[rows])
        total = total + part
    return total


def liger_nll(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
              config=None) -> torch.Tensor:
    """Summed cross-entropy through Liger's fused linear cross-entropy kernel (CUDA).

    Args:
        hidden: ``[tokens, hidden]`` final hidden states of positions that have a target.
        head: the LM head (an ``nn.Linear``).
        targets: ``[tokens]`` their target ids.
        config: the student's config (its soft cap, if any, goes to the kernel).
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    cap = getattr(config, "final_logit_softcapping", None)
    return liger_fused_linear_cross_entropy(hidden, head.weight, targets, bias=head.bias,
                                            ignore_index=IGNORE, reduction="sum", softcap=cap)


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int,
                   fused: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy over a batch's targets, without the whole logits.

    Equal to ``model(**batch).loss`` of a transformers causal LM up to float summation order.

    Args:
        model: a transformers causal LM (``base_model`` and ``get_output_embeddings``).
        batch: ``input_ids`` and ``labels``, with ``attention_mask`` (padded) or
            ``position_ids`` (packed).
        chunk: positions per chunk of the head (:func:`chunked_nll`).
        fused: Liger's kernel instead of the torch chunks (:func:`liger_nll`).

    Returns:
        A float32 scalar: the mean over targets (NaN when there are none, as transformers).
    """
    labels = batch["labels"]
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids")
              if key in batch}
    outputs = model.base_model(**inputs, use_cache=False)
    hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state
    targets = targets_of(labels).reshape(-1)
    keep = targets != IGNORE
    hidden = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]
    head = model.get_output_embeddings()
    total = (liger_nll(hidden, head, targets, model.config) if fused
             else chunked_nll(hidden, head, targets, chunk, model.config))
    return total / keep.sum()


AGREE = 2e-2
"""Relative gap between the chunked loss and transformers' at which a fit is refused: bf16
rounding moves a mean over a row's targets by about 1e-3; a logit transform the chunks miss
moves it by far more."""


def chunked_loss_refusal(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int,
                         fused: bool = False) -> str | None:
    """The one line refusing a family whose loss the chunks do not reproduce, or None.

    :func:`transform_logits` knows the logit transforms of the families transformers ships
    today; a family that changes its logits in its forward some other way would train on
    another loss without a word. So the first batch's row with the most targets is scored both
    ways, without gradients (one row: transformers' whole logits of one row fit where the
    batch's may not), by the path training takes (the torch chunks or Liger's kernel).

    Args:
        model: the student.
        batch: the first training batch (``labels`` and the model inputs).
        chunk: ``--model.loss_chunk``.
        fused: training takes Liger's kernel.
    """
    row = int((batch["labels"] != IGNORE).sum(dim=1).argmax())
    one = {key: value[row: row + 1] for key, value in batch.items()}
    with torch.no_grad():
        theirs = float(model(**one, use_cache=False).loss)
        ours = float(causal_lm_loss(model, one, chunk, fused=fused))
    if abs(ours - theirs) <= AGREE * abs(theirs) or (math.isnan(ours) and math.isnan(theirs)):
        return None
    return (f"--model.loss_chunk {chunk}: the chunked loss of the first batch's row {row} is "
            f"{ours:.6g} where transformers' is {theirs:.6g}: {type(model).__name__} changes "
            "its logits in a way selftrain/training/loss.py does not reproduce; unset "
            "--model.loss_chunk for this student")
