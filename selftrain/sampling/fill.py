"""The life of a sharded corpus, whatever samples its rows (``generate``, ``synthesize``).

Both samplers fill a :class:`selftrain.sampling.shards.ShardedCorpus` the same way: decide
what ``--out`` holds (fresh, resume, done, or a replacement filled beside it), let rank 0 start
the dir, split the missing shards over the ranks, write each shard as soon as its rows are all
sampled, total the counts over ranks and let rank 0 write the manifest with this run's timing.
Only the rows differ: each sampler hands :func:`fill_corpus` a function that samples the rows
of some ids.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from selftrain.sampling.ranks import barrier, sum_over_ranks
from selftrain.sampling.shards import ShardedCorpus

log = logging.getLogger(__name__)

RowsOf = Callable[[list[int]], Iterable[dict[str, Any]]]
"""Samples the given ids: yields a :func:`sampled_row` per id, in any order, as each ends."""


def sampled_row(sample_id: int, tokens: list[int], finished: bool, bos_id: int, tokenizer,
                num_subsets: int, source: str, **extra: Any) -> dict[str, Any]:
    """The corpus row of one sampled document: BOS and the sampled ids, the text without EOS.

    Args:
        sample_id: the row's id.
        tokens: the sampled ids, ending in EOS when ``finished``.
        finished: the document ended on EOS (not at the length cap).
        bos_id: the BOS id every row starts with.
        tokenizer: decodes the ``text`` column.
        num_subsets: K; row i goes to subset i mod K.
        source: the spec of the model that sampled it.
        extra: the command's own columns (``source_logprobs``, ``seed_id``), last.
    """
    body = tokens[:-1] if finished else tokens
    input_ids = [bos_id, *tokens]
    return {"id": sample_id, "input_ids": input_ids, "num_tokens": len(input_ids),
            "text": tokenizer.decode(body, skip_special_tokens=True), "finished": finished,
            "subset": sample_id % num_subsets, "source": source, **extra}


def fill_corpus(corpus: ShardedCorpus, rows_of: RowsOf, manifest: dict[str, Any],
                overwrite: bool, rank: int, world: int, progress: str, unit: str
                ) -> Path | None:
    """Fill the missing shards this rank owns, then (rank 0) write the manifest.

    Replace beside or resume, skip a finished corpus, claim shards, fill them, total the counts
    over ranks, finish on rank 0.

    Args:
        corpus: the corpus dir.
        rows_of: samples the rows of the given ids.
        manifest: the manifest's fields (counts and timing are added).
        overwrite: an existing corpus with other settings may be replaced.
        rank: this process's rank.
        world: the number of processes.
        progress: the progress bar's label (rank 0 shows one).
        unit: what the progress bar counts ("sample", "doc").

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
    tokens, samples, seconds = fill_shards(corpus, claim_shards(corpus, action, rank, world),
                                           rows_of, progress, unit, rank)
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


def fill_shards(corpus: ShardedCorpus, shards: list[int], rows_of: RowsOf, progress: str,
                unit: str, rank: int) -> tuple[int, int, float]:
    """Sample every id of the given shards, writing each shard as soon as it is complete.

    Args:
        corpus: the corpus being filled.
        shards: the shard indices this rank writes.
        rows_of: samples the rows of the given ids.
        progress: the progress bar's label.
        unit: what the progress bar counts.
        rank: this process's rank (only rank 0 shows a progress bar).

    Returns:
        (tokens sampled, samples sampled, seconds taken) on this rank.
    """
    ids = [i for k in shards for i in corpus.shard_ids(k)]
    rows = rows_of(ids)
    pending: dict[int, list[dict[str, Any]]] = {k: [] for k in shards}
    tokens = 0
    start = time.perf_counter()
    with tqdm(total=len(ids), unit=unit, desc=progress, disable=rank != 0, dynamic_ncols=True,
              mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
        for row in rows:
            shard = row["id"] // corpus.shard_size
            pending[shard].append(row)
            if len(pending[shard]) == len(corpus.shard_ids(shard)):
                corpus.write_shard(shard, pending.pop(shard))
            tokens += row["num_tokens"] - 1  # the sampled ids, BOS not among them
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}", refresh=False)
    return tokens, len(ids), time.perf_counter() - start


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
    ended, written = corpus.counts["finished"], corpus.counts["written"]
    log.info("%d of %d samples ended on EOS; the other %d stop at --max_new_tokens "
             "(--data.ended_only leaves them out of a student's rows)",
             ended, written, written - ended)
    return path
