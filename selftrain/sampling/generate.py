"""`selftrain generate`: sample corpora from a source model's BOS token alone.

No prompt, no chat template, no system text: every sequence starts as the single resolved BOS
id and the source samples until EOS or ``--max_new_tokens``. Ids go straight to the model
(never text), so no tokenizer adds a second BOS. Decoding is :class:`selftrain.decoding.sampler.
BosSampler` (KV cache, finished rows refilled, per-sample seeds), and the output is a corpus dir
filled shard by shard (:class:`selftrain.sampling.shards.ShardedCorpus`, through
:func:`selftrain.sampling.fill.fill_corpus`): a killed run resumes
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

from collections.abc import Iterable, Iterator
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

from selftrain.decoding.sampler import BosSampler
from selftrain.errors import Interrupted, SelftrainError
from selftrain.inputs import check_seed
from selftrain.models import (
    as_dtype,
    check_token_id,
    load_model,
    load_tokenizer,
    parse_model_spec,
)
from selftrain.outputs import refuse_input_overlap
from selftrain.precision import weight_dtype
from selftrain.provenance import resolved_spec, source_provenance
from selftrain.sampling.fill import fill_corpus, sampled_row
from selftrain.sampling.ranks import init_distributed, pick_device
from selftrain.sampling.settings import NUM_SAMPLES, check_sampling, decoding_checks
from selftrain.sampling.shards import ShardedCorpus

SAMPLER_VERSION = "bos-slots/1"
"""Bump when a change to the sampler changes what a given (seed, id) samples."""

FLAG_KEYS = ("model", "dtype", "sampler", "temperature", "top_p", "top_k", "max_new_tokens",
             "seed", "num_samples", "num_subsets", "shard_size", "bos_token_id")
"""Spec keys known from the flags alone (checked before the model loads)."""


def generate(
    model: str,
    out: str,
    num_samples: int = NUM_SAMPLES,
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
    host_every: int | None = None,
    cuda_graph: bool = False,
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
        host_every: decoding steps between two looks of the host at the batch; unset: 1 on
            a CPU, 8 on a GPU (samples are the same for every value).
        cuda_graph: replay each decoding step as a captured CUDA graph (a GPU only; samples
            are the same).
        overwrite: replace an existing corpus sampled with other settings.

    Returns:
        The corpus directories, one per temperature.
    """
    temperatures = temperature if isinstance(temperature, list) else [temperature]
    _validate(model, num_samples, max_new_tokens, temperatures, top_p, top_k, batch_size,
              num_subsets, shard_size, bos_token_id, seed, dtype, device, host_every,
              cuda_graph)
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
                                 seed=seed, top_k=top_k, top_p=top_p, record_logprobs=True,
                                 host_every=host_every, cuda_graph=cuda_graph)
            manifest = {**description,
                        "sampling": {"temperature": t, "top_p": top_p, "top_k": top_k,
                                     "max_new_tokens": max_new_tokens, "dtype": dtype,
                                     "sampler": SAMPLER_VERSION}}
            rows_of = partial(_rows, sampler, tokenizer, num_subsets=num_subsets,
                              source_name=model)
            path = fill_corpus(corpus, rows_of, manifest, overwrite, rank, world,
                               progress=f"generate t={t}", unit="sample")
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


def _rows(sampler: BosSampler, tokenizer, ids: list[int], *, num_subsets: int,
          source_name: str) -> Iterator[dict[str, Any]]:
    """Sample the given ids: each sample's corpus row, with its ``source_logprobs``.

    ``source_logprobs``: each sampled id's log-probability under the distribution it was drawn
    from (tempered, truncated).

    Args:
        sampler: the sampler at this corpus's temperature.
        tokenizer: the source's tokenizer (decodes the ``text`` column).
        ids: the ids to sample.
        num_subsets: K; row i goes to subset i mod K.
        source_name: the source's spec, written in every row.
    """
    for sample in sampler.sample(ids):
        yield sampled_row(sample.id, sample.tokens, sample.finished, sampler.bos_token_id,
                          tokenizer, num_subsets, source_name, source_logprobs=sample.logprobs)


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
              bos_token_id: int | None, seed: int, dtype: str, device: str,
              host_every: int | None, cuda_graph: bool) -> None:
    """Refuse bad flags before anything is loaded or written (see :func:`generate`)."""
    parse_model_spec(model, flag="--model")
    check_seed(seed, "--seed")
    as_dtype(dtype, "--dtype")
    target = pick_device(device)
    check_sampling(num_samples, max_new_tokens, temperatures, top_p, top_k, batch_size,
                   num_subsets, shard_size, decoding_checks(host_every, cuda_graph, target.type))
    check_token_id(bos_token_id, None, "--bos_token_id")
