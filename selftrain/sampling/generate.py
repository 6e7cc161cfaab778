"""`selftrain generate`: sample corpora from a source model's BOS token alone.

No prompt, no chat template, no system text: every sequence starts as the single resolved BOS
id and the source samples until EOS or ``--max_new_tokens``. Ids go straight to the model
(never text), so no tokenizer adds a second BOS. Decoding is :class:`selftrain.sampling.sampler.
BosSampler` (KV cache, finished rows refilled, per-sample seeds), and the output is a corpus dir
filled shard by shard (:class:`selftrain.sampling.shards.ShardedCorpus`): a killed run resumes
when the same command is run again, and ``torchrun --nproc-per-node P`` splits the shards over P
ranks.

Ctrl-C ends the run with :class:`selftrain.errors.Interrupted`, which says how many shards are
on disk; the same command resumes from them.

Sample i depends only on (model, sampling settings, seed, i), never on the batch size, the
number of processes or where a run was resumed. A list of temperatures samples one corpus per
temperature under ``--out`` (``t0.75/``, ``t1.0/``, ...), loading the model once; sample i uses
the same random stream at every temperature.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from selftrain.errors import Interrupted, SelftrainError, refuse_first_failed
from selftrain.inputs import check_seed
from selftrain.models import (
    as_dtype,
    check_token_id,
    load_model,
    load_tokenizer,
    parse_model_spec,
    resolve_bos_id,
    weights_digest,
)
from selftrain.outputs import refuse_input_overlap
from selftrain.precision import weight_dtype
from selftrain.provenance import provenance
from selftrain.sampling.ranks import barrier, init_distributed, pick_device, sum_over_ranks
from selftrain.sampling.sampler import BosSampler, Sample
from selftrain.sampling.shards import ShardedCorpus

log = logging.getLogger(__name__)

SAMPLER_VERSION = "bos-slots/1"
"""Bump when a change to the sampler changes what a given (seed, id) samples."""

FLAG_KEYS = ("model", "dtype", "sampler", "temperature", "top_p", "top_k", "max_new_tokens",
             "seed", "num_samples", "num_subsets", "shard_size", "bos_token_id")
"""Spec keys known from the flags alone (checked before the model loads)."""


def generate(
    model: str,
    out: str,
    num_samples: int = 1000,
    max_new_tokens: int = 256,
    temperature: float | list[float] = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 16,
    seed: int = 0,
    num_subsets: int = 1,
    shard_size: int = 10_000,
    bos_token_id: int | None = None,
    dtype: str = "float32",
    device: str = "auto",
    overwrite: bool = False,
) -> list[Path]:
    """Sample a corpus (one per temperature) from the BOS token of a source model.

    Rerunning the same command resumes an interrupted run; under ``torchrun`` each rank samples
    its own shards and rank 0 writes the manifest at the end.

    Args:
        model: source model spec: hub id, local HF dir, embedded:smollm2-135m, tiny:<family>
            or shape:<name> (real size, random weights).
        out: corpus dir to write; with a list of temperatures, the parent of one dir each.
        num_samples: sequences to sample (per temperature).
        max_new_tokens: length cap per sequence, BOS not counted.
        temperature: sampling temperature (> 0), or a list such as [0.75, 1.0, 1.25].
        top_p: nucleus mass; 1.0 turns it off (pure sampling at the temperature).
        top_k: keep the k most likely tokens; 0 turns it off.
        batch_size: rows decoded together; finished rows are refilled at once.
        seed: base seed (0..2**63-1); sample i draws its randomness from (seed, i) alone.
        num_subsets: K disjoint subsets (row i gets subset i mod K), one student per subset.
        shard_size: rows per parquet shard, the unit of resuming and of splitting over ranks.
        bos_token_id: override the resolved BOS id.
        dtype: float32, bfloat16 or float16 for the source's weights, or auto (bfloat16
            where the device computes it natively, else float32); the manifest records the
            resolved one, so a resume on a machine that resolves it otherwise is refused.
        device: "auto" (this rank's CUDA device if there is one), "cpu" or "cuda[:N]".
        overwrite: replace an existing corpus sampled with other settings.

    Returns:
        The corpus directories, one per temperature.
    """
    temperatures = temperature if isinstance(temperature, list) else [temperature]
    _validate(model, num_samples, max_new_tokens, temperatures, top_p, top_k, batch_size,
              num_subsets, shard_size, bos_token_id, seed, dtype, device)
    dtype = weight_dtype(dtype, pick_device(device))  # auto: the manifest records what ran
    flags = {"model": model, "dtype": dtype, "sampler": SAMPLER_VERSION, "top_p": top_p,
             "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed,
             "num_samples": num_samples, "num_subsets": num_subsets, "shard_size": shard_size,
             "bos_token_id": bos_token_id}
    targets = {t: Path(out) / f"t{float(t)}" if isinstance(temperature, list) else Path(out)
               for t in temperatures}
    _refuse_before_loading(targets, flags, num_samples, shard_size, overwrite)

    target_device = pick_device(device)
    rank, world = init_distributed(target_device)
    tokenizer = load_tokenizer(model, flag="--model")
    source = load_model(model, dtype=dtype, flag="--model").to(target_device).eval()
    check_context(source, max_new_tokens)
    record = source_provenance(model, tokenizer, source, bos_token_id)
    description = {"kind": "synthetic", **record, "seed": seed, "num_subsets": num_subsets,
                   "decontamination": None}
    resolved = resolved_spec(model, record)
    corpora = {t: ShardedCorpus(target, {**flags, "temperature": t, **resolved},
                                num_samples, shard_size) for t, target in targets.items()}
    written = []
    try:
        for t, corpus in corpora.items():
            sampler = BosSampler(source, record["bos_token_id"], record["eos_token_id"],
                                 vocab_size=len(tokenizer), temperature=t,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 seed=seed, top_k=top_k, top_p=top_p, record_logprobs=True)
            manifest = {**description,
                        "sampling": {"temperature": t, "top_p": top_p, "top_k": top_k,
                                     "max_new_tokens": max_new_tokens, "dtype": dtype,
                                     "sampler": SAMPLER_VERSION}}
            path = fill_corpus(corpus, partial(_fill_shards, corpus, sampler, tokenizer,
                                               num_subsets=num_subsets, source_name=model,
                                               rank=rank),
                               manifest, overwrite, rank, world)
            if path is not None:
                written.append(path)
    except KeyboardInterrupt as interrupt:
        total = sum(corpus.num_shards for corpus in corpora.values())
        raise Interrupted(f"interrupted after {_shards_done(corpora.values())} of {total} "
                          "shards; rerun the same command to resume") from interrupt
    return written


def _shards_done(corpora: Iterable[ShardedCorpus]) -> int:
    """Shards on disk that belong to this run's corpora, over every temperature.

    A dir counts when it holds this run's spec (its plan or its manifest): the corpus this run
    was filling, finished ones, and ones an earlier run of the same command left. Shards of an
    older corpus with other settings, not replaced yet, do not.

    Args:
        corpora: this run's corpora, one per temperature.
    """
    done = 0
    for corpus in corpora:
        with suppress(SelftrainError):
            if corpus.check(overwrite=False) in ("done", "resume"):
                done += corpus.complete_shards()
    return done


def _refuse_before_loading(targets: dict[float, Path], flags: dict[str, Any], num_samples: int,
                           shard_size: int, overwrite: bool) -> None:
    """Refuse an ``--out`` holding something else or a local ``--model``, on the flags alone.

    Args:
        targets: temperature -> its corpus dir.
        flags: the spec keys known from the flags.
        num_samples: sequences per corpus.
        shard_size: rows per shard.
        overwrite: an existing different corpus may be replaced.
    """
    for t, target in targets.items():
        refuse_input_overlap(target, [("--model", flags["model"])])
        ShardedCorpus(target, {**flags, "temperature": t}, num_samples, shard_size).check(
            overwrite, compare=FLAG_KEYS)


def source_provenance(model: str, tokenizer, source, bos_token_id: int | None,
                      flag: str = "--bos_token_id") -> dict[str, Any]:
    """Resolve the source's BOS and EOS ids, check the BOS id, and record where they came from.

    Args:
        model: the source's spec.
        tokenizer: its tokenizer.
        source: the loaded source model.
        bos_token_id: the BOS override (``--bos_token_id``), or None.
        flag: where the override came from, named when it is outside the vocabulary.

    Returns:
        The manifest's provenance fields (:func:`selftrain.provenance.provenance`).
    """
    bos_id, bos_source = resolve_bos_id(tokenizer, source.config, bos_token_id)
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (
        source.config.eos_token_id)
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    check_token_id(bos_id, source.get_input_embeddings().weight.shape[0], flag)
    return provenance(tokenizer, model, bos_id, bos_source, eos_id, source_config=source.config)


def resolved_spec(model: str, record: dict[str, Any]) -> dict[str, Any]:
    """The spec keys known only once the model is loaded, from its provenance record.

    A local model dir (an ``hf/epoch=N`` export may be trained again in place) adds the hash
    of its weight files, which its config-only revision does not cover.

    Args:
        model: the model's spec.
        record: its provenance (:func:`source_provenance`).
    """
    spec = {"revision": record["source"]["revision"],
            "tokenizer_fingerprint": record["tokenizer"]["fingerprint"],
            "resolved_bos_token_id": record["bos_token_id"],
            "eos_token_id": record["eos_token_id"]}
    weights = weights_digest(model)
    if weights is not None:
        spec["weights_sha256"] = weights
    return spec


def fill_corpus(corpus: ShardedCorpus, fill: Callable[[list[int]], tuple[int, int, float]],
                manifest: dict[str, Any], overwrite: bool, rank: int, world: int
                ) -> Path | None:
    """Fill the missing shards this rank owns, then (rank 0) write the manifest.

    The whole life of a sharded corpus, whatever writes its rows (``generate``,
    ``synthesize``): replace beside or resume, skip a finished one, claim shards, fill them,
    total the counts over ranks, finish on rank 0.

    Args:
        corpus: the corpus dir.
        fill: writes the rows of the given shards; returns (tokens, samples, seconds).
        manifest: the manifest's fields (counts and timing are added).
        overwrite: an existing corpus with other settings may be replaced.
        rank: this process's rank.
        world: the number of processes.

    Returns:
        The corpus dir on rank 0 (and on every rank when it was already complete), else None.
    """
    action = corpus.check(overwrite)
    if action == "replace":  # filled beside --out; the old corpus goes once the new is whole
        action = corpus.stage_replacement()
    barrier(world)  # every rank has looked at --out before rank 0 changes it
    if action == "done":
        log.info("%s is already complete with these settings; nothing to do", corpus.out)
        return corpus.out
    tokens, samples, seconds = fill(claim_shards(corpus, action, rank, world))
    tokens_all, samples_all = sum_over_ranks([tokens, samples], world)
    barrier(world)
    if rank != 0:
        return None
    return finish_corpus(corpus, manifest, seconds, world, samples_all, tokens_all)


def claim_shards(corpus: ShardedCorpus, action: str, rank: int, world: int) -> list[int]:
    """Start (or resume) the dir on rank 0, then give each rank its share of the missing shards.

    Args:
        corpus: the corpus being filled.
        action: what :meth:`ShardedCorpus.check` decided ("fresh", "resume" or "replace").
        rank: this process's rank.
        world: the number of processes.
    """
    if rank == 0:
        corpus.start(replace=action == "replace")
    barrier(world)
    missing = corpus.missing_shards()
    barrier(world)  # every rank has listed the dir before anyone writes to it
    if action == "resume" and rank == 0:
        log.info("resuming %s: %d of %d shards already written", corpus.out,
                 corpus.num_shards - len(missing), corpus.num_shards)
    return missing[rank::world]


def _fill_shards(corpus: ShardedCorpus, sampler: BosSampler, tokenizer, shards: list[int], *,
                 num_subsets: int, source_name: str, rank: int) -> tuple[int, int, float]:
    """Sample every id of the given shards, writing each shard as soon as it is complete.

    Args:
        corpus: the corpus being filled.
        sampler: the sampler at this corpus's temperature.
        tokenizer: the source's tokenizer (decodes the ``text`` column).
        shards: the shard indices this rank writes.
        num_subsets: K; row i goes to subset i mod K.
        source_name: the source's spec, written in every row.
        rank: this process's rank (only rank 0 shows a progress bar).

    Returns:
        (tokens sampled, samples sampled, seconds taken) on this rank.
    """
    ids = [i for k in shards for i in corpus.shard_ids(k)]
    pending: dict[int, list[dict[str, Any]]] = {k: [] for k in shards}
    tokens = 0
    start = time.perf_counter()
    with tqdm(total=len(ids), unit="sample", desc=f"generate t={sampler.temperature}",
              disable=rank != 0, dynamic_ncols=True,
              mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
        for sample in sampler.sample(ids):
            shard = sample.id // corpus.shard_size
            pending[shard].append(_row(sample, sampler.bos_token_id, tokenizer, num_subsets,
                                       source_name))
            if len(pending[shard]) == len(corpus.shard_ids(shard)):
                corpus.write_shard(shard, pending.pop(shard))
            tokens += len(sample.tokens)
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}", refresh=False)
    return tokens, len(ids), time.perf_counter() - start


def _row(sample: Sample, bos_token_id: int, tokenizer, num_subsets: int,
         source_name: str) -> dict[str, Any]:
    """The corpus row of one sample: BOS and the sampled ids, the text without EOS.

    ``source_logprobs``: each sampled id's log-probability under the distribution it was drawn
    from (tempered, truncated).
    """
    body = sample.tokens[:-1] if sample.finished else sample.tokens
    input_ids = [bos_token_id, *sample.tokens]
    return {"id": sample.id, "input_ids": input_ids, "num_tokens": len(input_ids),
            "text": tokenizer.decode(body, skip_special_tokens=True),
            "finished": sample.finished, "subset": sample.id % num_subsets,
            "source": source_name, "source_logprobs": sample.logprobs}


def finish_corpus(corpus: ShardedCorpus, manifest: dict[str, Any], seconds: float, world: int,
            samples: int, tokens: int) -> Path:
    """Write the manifest with this run's timing (rank 0, once every rank is done).

    Args:
        corpus: the filled corpus.
        manifest: its fields so far.
        seconds: this run's sampling time on rank 0.
        world: the number of processes.
        samples: samples this run sampled, over all ranks.
        tokens: tokens this run sampled, over all ranks.
    """
    manifest = {**manifest, "timing": {
        "seconds": round(seconds, 2), "processes": world, "samples_this_run": samples,
        "tokens_this_run": tokens, "tokens_per_sec": round(tokens / max(seconds, 1e-9), 1)}}
    path = corpus.finish(manifest)
    log.info("wrote %s: %d samples; this run sampled %d tokens at %.0f tokens/s",
             path, corpus.num_samples, tokens, tokens / max(seconds, 1e-9))
    return path


def check_context(source: Any, max_new_tokens: int) -> None:
    """Refuse more new tokens than the model has positions for (BOS takes one), before sampling.

    Args:
        source: the loaded model.
        max_new_tokens: ``--max_new_tokens``.
    """
    positions = getattr(getattr(source, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and max_new_tokens + 1 > positions:
        raise SelftrainError(f"--max_new_tokens {max_new_tokens}: the model has {positions} "
                             f"positions and BOS takes one, so at most {positions - 1} new "
                             "tokens; lower it")


def _validate(model: str, num_samples: int, max_new_tokens: int, temperatures: list[float],
              top_p: float, top_k: int, batch_size: int, num_subsets: int, shard_size: int,
              bos_token_id: int | None, seed: int, dtype: str, device: str) -> None:
    """Refuse bad flags before anything is loaded or written (see :func:`generate`)."""
    parse_model_spec(model, flag="--model")
    check_seed(seed, "--seed")
    as_dtype(dtype, "--dtype")
    pick_device(device)
    shown = temperatures[0] if len(temperatures) == 1 else temperatures
    checks = [
        (num_samples > 0, "--num_samples", num_samples, "must be > 0"),
        (max_new_tokens >= 1, "--max_new_tokens", max_new_tokens, "must be >= 1"),
        (len(temperatures) > 0, "--temperature", shown, "an empty list; give one value or "
                                                        "several"),
        (all(t > 0 and math.isfinite(t) for t in temperatures), "--temperature", shown,
         "must be > 0 (greedy decoding is not sampling)"),
        (len(set(temperatures)) == len(temperatures), "--temperature", shown,
         "lists a value twice"),
        (0 < top_p <= 1, "--top_p", top_p, "must be in (0, 1]; 1 turns it off"),
        (top_k >= 0, "--top_k", top_k, "must be >= 0; 0 turns it off"),
        (batch_size >= 1, "--batch_size", batch_size, "must be >= 1"),
        (num_subsets >= 1, "--num_subsets", num_subsets, "must be >= 1"),
        (shard_size >= 1, "--shard_size", shard_size, "must be >= 1"),
    ]
    refuse_first_failed((ok, f"{flag} {value}: {rule}") for ok, flag, value, rule in checks)
    check_token_id(bos_token_id, None, "--bos_token_id")
