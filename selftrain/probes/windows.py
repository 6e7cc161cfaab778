"""Probe sets and the maths of the two memorization probes.

A probe set is a parquet or jsonl file of rows with ``text`` or ``input_ids`` and a ``domain``.
Each row gives one window: its first ``prefix_tokens`` tokens are the prefix y, the next
``suffix_tokens`` the true continuation x (32 + 32 by default, as in Biderman et al. 2023 and
the Pythia memorized-sequence sets). The measurements:

- :func:`teacher_forced` -- one teacher-forced forward over prefix + continuation gives, per
  row, log p(x | y) summed over the continuation (the likelihood probe) and how many leading
  continuation tokens greedy decoding reproduces: greedy decoding's first divergence from x is
  the first position whose argmax (given the true tokens before it) is not the true token, and
  up to it the greedy tokens *are* x. A row is *memorized* (extracted) iff all of them match.
- :func:`continuation_logprobs` -- its log p(x | y) alone.
- :func:`greedy_continuations` -- real greedy decoding, with a KV cache: what the model
  continues with after its first divergence, where it is conditioned on its own tokens.
- :func:`greedy_counts` -- Pythia's memorization score per row: positions where the greedy
  continuation equals x. Rows the teacher-forced pass settles (all tokens, or all but the last,
  reproduced) are not decoded; the others are, with :func:`greedy_continuations`, and so is
  any row whose memorized status rests on a near-tie of the true token and the best other
  (:func:`near_ties`), which bf16 rounding could decide either way on the two paths.

These take equal-length rows, so batches need no padding and results do not depend on the
batch size. :func:`token_nll_rows` / :func:`token_nll_sums` give the next-token NLL of ragged
rows (the training-corpus sample the likelihood tracker follows).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from selftrain.errors import SelftrainError
from selftrain.inputs import check_rows
from selftrain.models import kv_cache_argument, tokenizer_fingerprint
from selftrain.probe_file import read_probe_rows
from selftrain.training.batching import pad_collate


@dataclass
class ProbeSet:
    """Probe windows ready for the student.

    Args:
        path: the file it came from.
        input_ids: ``[N, prefix_tokens + suffix_tokens]`` token ids (long).
        domain_index: ``[N]`` index into ``domains`` per row.
        domains: domain names, sorted.
        prefix_tokens: tokens of each prefix.
        suffix_tokens: tokens of each true continuation.
    """

    path: Path
    input_ids: torch.Tensor
    domain_index: torch.Tensor
    domains: list[str]
    prefix_tokens: int
    suffix_tokens: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def prefixes(self) -> torch.Tensor:
        """``[N, prefix_tokens]`` prefixes y."""
        return self.input_ids[:, : self.prefix_tokens]

    @property
    def suffixes(self) -> torch.Tensor:
        """``[N, suffix_tokens]`` true continuations x."""
        return self.input_ids[:, self.prefix_tokens:]

    def fingerprint(self) -> str:
        """Hash of the ids, domains and split: equal iff the probes are the same."""
        digest = hashlib.sha256()
        digest.update(self.input_ids.numpy().astype(np.int64).tobytes())
        digest.update(self.domain_index.numpy().astype(np.int64).tobytes())
        digest.update(json.dumps([self.domains, self.prefix_tokens, self.suffix_tokens,
                                  list(self.input_ids.shape)]).encode())
        return digest.hexdigest()[:16]


def load_probe_set(path: str | Path, tokenizer, prefix_tokens: int = 32,
                   suffix_tokens: int = 32, flag: str = "--probe_set",
                   same_tokenizer: bool | None = None) -> ProbeSet:
    """Read a probe set and cut each row to one prefix + continuation window.

    Stored ``input_ids`` are used as they are when they are the student's (the file's
    tokenizer fingerprint matches, or there is no ``text`` to tokenize); otherwise ``text``
    is tokenized without special tokens. Rows without a ``domain`` belong to ``all``.

    Args:
        path: parquet or jsonl file.
        tokenizer: the student's tokenizer.
        prefix_tokens: prefix length y.
        suffix_tokens: continuation length x.
        flag: the flag the path came from, named in error messages.
        same_tokenizer: force using (True) or ignoring (False) stored ``input_ids``.

    Raises:
        SelftrainError: missing, damaged or empty file, a ``text`` that is not a string or
            ``input_ids`` that are not token ids, rows shorter than the window, ids outside
            the student's vocabulary.
    """
    if prefix_tokens < 1 or suffix_tokens < 1:
        raise SelftrainError(f"{flag}: prefix and suffix lengths must be >= 1, got "
                             f"{prefix_tokens} + {suffix_tokens}")
    columns, metadata = read_probe_rows(path, flag)
    count = len(next(iter(columns.values()), []))
    if count == 0:
        raise SelftrainError(f"{flag} {path}: the probe set is empty")
    if "input_ids" not in columns and "text" not in columns:
        raise SelftrainError(f"{flag} {path}: rows need a 'text' or 'input_ids' column")
    check_rows(columns, Path(path), flag)
    use_ids = "input_ids" in columns and (
        same_tokenizer if same_tokenizer is not None else (
            "text" not in columns
            or metadata.get("tokenizer_fingerprint") == tokenizer_fingerprint(tokenizer)))
    if use_ids:
        sequences = [list(ids or []) for ids in columns["input_ids"]]
    else:
        if "text" not in columns:
            raise SelftrainError(f"{flag} {path}: its input_ids are not the student's and it "
                                 "has no 'text' column to tokenize")
        texts = [text or "" for text in columns["text"]]
        sequences = tokenizer(texts, add_special_tokens=False)["input_ids"]
    window = prefix_tokens + suffix_tokens
    short = sum(len(ids) < window for ids in sequences)
    if short:
        raise SelftrainError(
            f"{flag} {path}: {short} of {count} rows have fewer than {window} tokens (prefix "
            f"{prefix_tokens} + suffix {suffix_tokens}) under the student's tokenizer; drop "
            "those rows or lower the prefix/suffix lengths")
    input_ids = torch.tensor([ids[:window] for ids in sequences], dtype=torch.long)
    if int(input_ids.max()) >= len(tokenizer) or int(input_ids.min()) < 0:
        raise SelftrainError(f"{flag} {path}: token ids outside the student's vocabulary "
                             f"({len(tokenizer)} tokens); store 'text' so it can be tokenized")
    names = [str(d) if d is not None else "all" for d in columns.get("domain", ["all"] * count)]
    domains = sorted(set(names))
    bad = [d for d in domains if not d or "/" in d]
    if bad:
        raise SelftrainError(f"{flag} {path}: domain names must be non-empty and contain no "
                             f"'/' (they become TensorBoard tags): {bad[:3]}")
    lookup = {name: i for i, name in enumerate(domains)}
    domain_index = torch.tensor([lookup[d] for d in names], dtype=torch.long)
    return ProbeSet(Path(path), input_ids, domain_index, domains, prefix_tokens, suffix_tokens)


def shard_rows(count: int, rank: int, world_size: int) -> torch.Tensor:
    """Row indices this rank evaluates: ``rank, rank + W, ...`` (every row exactly once).

    A rank past the last row gets an empty shard (it must still take part in the gather).
    """
    return torch.arange(min(rank, count), count, world_size)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_continuations(model: torch.nn.Module, prefixes: torch.Tensor, new_tokens: int,
                         batch_size: int = 32) -> torch.Tensor:
    """Greedy (argmax) continuation of equal-length prefixes, with a KV cache.

    Args:
        model: a transformers causal LM (eval mode is the caller's job).
        prefixes: ``[N, P]`` token ids.
        new_tokens: tokens to generate per row.
        batch_size: rows per forward pass.

    Returns:
        ``[N, new_tokens]`` generated ids (on the CPU).
    """
    device = _device(model)
    cache_argument = kv_cache_argument(model)
    out = torch.empty((prefixes.shape[0], new_tokens), dtype=torch.long)
    for start in range(0, prefixes.shape[0], batch_size):
        ids = prefixes[start:start + batch_size].to(device)
        step = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        generated = torch.empty((ids.shape[0], new_tokens), dtype=torch.long, device=device)
        for position in range(new_tokens):
            token = step.logits[:, -1].argmax(dim=-1)
            generated[:, position] = token
            if position + 1 < new_tokens:
                step = model(input_ids=token[:, None], use_cache=True,
                             **{cache_argument: step[cache_argument]})
        out[start:start + ids.shape[0]] = generated.cpu()
    return out


@dataclass
class TeacherForced:
    """Per-row results of one teacher-forced forward over prefix + continuation.

    Args:
        logprobs: ``[N]`` float64 log p(x | y), summed over the continuation.
        extracted: ``[N]`` long: leading continuation tokens whose argmax, given the true
            tokens before them, is the true token -- the tokens greedy decoding reproduces
            before it first diverges (``suffix_tokens`` when it reproduces them all).
    """

    logprobs: torch.Tensor
    extracted: torch.Tensor
    close: torch.Tensor | None = None
    """``[N]`` bool: rows whose memorized status rests on a near-tie (:func:`near_ties`)."""


NEAR_TIE_ULPS = 1
"""A true token within this many units of the logits' last place of the best other token is
a near-tie: bf16 rounding (a step of 0.125 around a logit of 20) may decide it either way."""


def near_ties(logits: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: rows that greedy decoding may or may not reproduce whole, by rounding.

    A row is reproduced whole iff at every position the true token beats every other. The
    teacher-forced pass and greedy decoding compute the same logits along different paths
    (one forward against a KV cache step by step); in bf16 they differ by a unit in the last
    place or so, which decides a position where the true token and the best other one are
    that close. So a row with no position clearly lost and at least one this close is
    decoded; any other row is settled by the pass either way. In float32 such rows are rare
    and the two paths agree row for row (tests/test_windows.py).

    Args:
        logits: ``[N, S, vocab]`` next-token logits over the continuation, in the dtype the
            model produced them (its last place sets the margin).
        true: ``[N, S]`` the true continuation.
    """
    true_logit = logits.gather(-1, true[..., None]).squeeze(-1).float()
    top = logits.topk(2, dim=-1)
    best_other = torch.where(top.indices[..., 0] == true, top.values[..., 1],
                             top.values[..., 0]).float()
    lead = true_logit - best_other
    ulp = torch.finfo(logits.dtype).eps * true_logit.abs().clamp_min(1.0)
    lost = (lead < -NEAR_TIE_ULPS * ulp).any(dim=-1)
    return ~lost & (lead.abs() <= NEAR_TIE_ULPS * ulp).any(dim=-1)


def leading_matches(predicted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """``[N]`` long: positions before the first one where ``predicted`` differs from ``true``.

    Args:
        predicted: ``[N, S]`` token ids.
        true: ``[N, S]`` token ids.
    """
    return (predicted == true).long().cumprod(dim=-1).sum(dim=-1)


@torch.no_grad()
def teacher_forced(model: torch.nn.Module, input_ids: torch.Tensor, prefix_tokens: int,
                   batch_size: int = 32) -> TeacherForced:
    """One forward per batch over whole windows: log p(x | y) and the greedily extracted tokens.

    Args:
        model: a transformers causal LM.
        input_ids: ``[N, P + S]`` windows.
        prefix_tokens: P; the first continuation token is predicted from position P - 1.
        batch_size: rows per forward pass.

    Returns:
        per-row :class:`TeacherForced` (on the CPU).
    """
    device = _device(model)
    suffix = input_ids.shape[1] - prefix_tokens
    logprobs = torch.empty(input_ids.shape[0], dtype=torch.float64)
    extracted = torch.empty(input_ids.shape[0], dtype=torch.long)
    close = torch.empty(input_ids.shape[0], dtype=torch.bool)
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=suffix + 1).logits[:, :-1]
        true = ids[:, prefix_tokens:]
        picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, true[..., None])
        end = start + ids.shape[0]
        logprobs[start:end] = picked.squeeze(-1).double().sum(dim=-1).cpu()
        # argmax of the logits as greedy decoding takes it (ties: the first index, as there)
        extracted[start:end] = leading_matches(logits.argmax(dim=-1), true).cpu()
        close[start:end] = near_ties(logits, true).cpu()
    return TeacherForced(logprobs, extracted, close)


def continuation_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, prefix_tokens: int,
                          batch_size: int = 32) -> torch.Tensor:
    """Log p(x | y) per row, summed over the continuation x = ``input_ids[:, prefix_tokens:]``.

    Args:
        model: a transformers causal LM.
        input_ids: ``[N, P + S]`` windows.
        prefix_tokens: P; the first continuation token is predicted from position P - 1.
        batch_size: rows per forward pass.

    Returns:
        ``[N]`` float64 log-probabilities (on the CPU), :func:`teacher_forced`'s.
    """
    return teacher_forced(model, input_ids, prefix_tokens, batch_size).logprobs


def needs_decoding(extracted: torch.Tensor, suffix_tokens: int,
                   close: torch.Tensor | None = None, match_rate: bool = True) -> torch.Tensor:
    """``[N]`` bool: rows whose greedy counts the teacher-forced pass does not settle.

    A row that reproduces all ``S`` tokens matches ``S``; one that reproduces ``S - 1`` and
    diverges at the last token matches ``S - 1``. Any other row continues after its first
    divergence from its own tokens, which only decoding tells (needed for the match rate
    alone). A row whose memorized status rests on a near-tie is decoded in any case.

    Args:
        extracted: ``[N]`` :attr:`TeacherForced.extracted`.
        suffix_tokens: S.
        close: ``[N]`` :attr:`TeacherForced.close` (None: no near-ties).
        match_rate: whether the match counts are wanted (else only near-ties are decoded).
    """
    todo = (extracted < suffix_tokens - 1) if match_rate else torch.zeros_like(
        extracted, dtype=torch.bool)
    return todo if close is None else todo | close


def greedy_counts(model: torch.nn.Module, input_ids: torch.Tensor, prefix_tokens: int,
                  extracted: torch.Tensor, decode: torch.Tensor, batch_size: int = 32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Extracted and matched tokens per row as greedy decoding gives them.

    Matched tokens are Pythia's memorization score: positions where the greedy continuation
    equals the true one. Only the ``decode`` rows are decoded (:func:`needs_decoding`); the
    others' counts follow from ``extracted`` (matched = extracted for ``S`` and ``S - 1``).

    Args:
        model: a transformers causal LM (eval mode is the caller's job).
        input_ids: ``[N, P + S]`` windows.
        prefix_tokens: P.
        extracted: ``[N]`` :attr:`TeacherForced.extracted` of these rows.
        decode: ``[N]`` bool, the rows to decode.
        batch_size: rows per forward pass of the decoding.

    Returns:
        ``[N]`` long extracted and ``[N]`` long matched counts in ``0..S`` (on the CPU).
    """
    suffix = input_ids.shape[1] - prefix_tokens
    extracted = extracted.clone().long().cpu()
    matched = extracted.clone()
    todo = decode.cpu().nonzero().squeeze(-1)
    if len(todo):
        generated = greedy_continuations(model, input_ids[todo, :prefix_tokens], suffix,
                                         batch_size)
        true = input_ids[todo, prefix_tokens:].cpu()
        extracted[todo] = leading_matches(generated, true)
        matched[todo] = (generated == true).sum(dim=-1)
    return extracted, matched


@torch.no_grad()
def token_nll_rows(model: torch.nn.Module, rows: list[list[int]], pad_id: int,
                   batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and the number of predicted tokens of each ragged row.

    Per-row values can be gathered over ranks and summed in row order, so a corpus NLL does
    not depend on how the rows were split or batched.

    Args:
        model: a transformers causal LM.
        rows: token id lists (each row's first token is context only).
        pad_id: id used for padding (masked out).
        batch_size: rows per forward pass.

    Returns:
        ``([N] float64 NLL sums, [N] long predicted-token counts)``, on the CPU.
    """
    device = _device(model)
    sums = torch.zeros(len(rows), dtype=torch.float64)
    counts = torch.zeros(len(rows), dtype=torch.long)
    for start in range(0, len(rows), batch_size):
        batch = pad_collate([{"input_ids": ids} for ids in rows[start:start + batch_size]],
                            pad_id=pad_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
        labels = batch["labels"][:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        end = start + labels.shape[0]
        sums[start:end] = nll.double().sum(dim=-1).cpu()
        counts[start:end] = (labels != -100).sum(dim=-1).cpu()
    return sums, counts


def token_nll_sums(model: torch.nn.Module, rows: list[list[int]], pad_id: int,
                   batch_size: int = 16) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens over ragged rows.

    Args:
        model: a transformers causal LM.
        rows: token id lists (each row's first token is context only).
        pad_id: id used for padding (masked out).
        batch_size: rows per forward pass.
    """
    sums, counts = token_nll_rows(model, rows, pad_id, batch_size)
    return float(sums.sum()), int(counts.sum())
