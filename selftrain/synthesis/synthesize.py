"""`selftrain synthesize`: one new document per seed document, from an SBP synthesizer.

The synthesizer is a causal LM trained with ``selftrain fit`` on a pairs dir (its export
records the separator and the d1 budget it was trained with). Sample i draws its seed document
uniformly from the seed corpus with its own stream (``--seed``, i), is prompted with
``BOS d1 SEP`` exactly as the synthesizer was trained (:func:`selftrain.synthesis.layout.
prompt_ids`) and continues until EOS or ``--max_new_tokens`` through the prompted decoder, whose
draws depend only on (``--seed``, i, step). So sample i depends on nothing but the synthesizer,
the seeds, the settings and i: not on the batch, the ranks or where a run was resumed.

The output is an ordinary corpus dir (``kind: sbp``), filled shard by shard like ``selftrain
generate`` (:class:`selftrain.sampling.shards.ShardedCorpus`): rerunning a killed command
resumes it, ``torchrun`` splits the shards over ranks, and each row holds the new document
alone (``BOS d2 EOS`` as ``input_ids``, d2 as ``text``) with the id of its seed (``seed_id``).

``--unseeded true`` is SBP's control: every prompt is ``BOS SEP`` (an empty d1), so the
documents are what the synthesizer writes from no seed, at the same settings; ``seed_id`` is
:data:`UNSEEDED`. No training row has an empty d1, so that prompt is outside what the
synthesizer was trained on: the control separates "conditioned on a related seed" from "this
synthesizer with no seed", not from an unconditional model.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from selftrain.corpus import SCHEMA, corpus_documents
from selftrain.decoding.prompted import Prompt, PromptedDecoder
from selftrain.errors import Interrupted, SelftrainError, refuse_first_failed
from selftrain.inputs import check_seed
from selftrain.models import (
    as_dtype,
    export_info,
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
from selftrain.synthesis.layout import prompt_ids, separator_ids

log = logging.getLogger(__name__)

SYNTHESIZER_VERSION = "sbp-prompted/1"
"""Bump when a change here changes what a given (seed, id) synthesizes."""
SBP_SCHEMA = SCHEMA.append(pa.field("seed_id", pa.int64()))
UNSEEDED = -1
"""``seed_id`` of a document synthesized from an empty d1 (``--unseeded true``)."""
FLAG_KEYS = ("synthesizer", "unseeded", "seeds", "seeds_sha256", "seeds_subset",
             "seeds_num_subsets", "num_samples", "max_new_tokens", "temperature", "top_p",
             "top_k", "seed", "num_subsets", "shard_size", "dtype", "version")
"""Spec keys known from the flags alone (checked before the synthesizer loads)."""


def synthesize(
    synthesizer: str,
    out: str,
    seeds: str | None = None,
    unseeded: bool = False,
    num_samples: int = NUM_SAMPLES,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 16,
    seed: int = 0,
    num_subsets: int = 1,
    shard_size: int = 10_000,
    separator: str | None = None,
    max_d1_tokens: int | None = None,
    seeds_subset: int | None = None,
    seeds_num_subsets: int | None = None,
    dtype: str = "float32",
    device: str = "auto",
    host_every: int | None = None,
    cuda_graph: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write one synthetic document per sample, each conditioned on a uniformly drawn seed.

    Rerunning the same command resumes an interrupted run; under ``torchrun`` each rank
    synthesizes its own shards and rank 0 writes the manifest at the end.

    Args:
        synthesizer: the synthesizer's model spec, typically an export of a ``selftrain fit``
            on a pairs dir (``<run>/hf/epoch=N``), whose record gives the separator and d1
            budget.
        out: corpus dir to write.
        seeds: the real corpus the seed documents (d1) are drawn from: a corpus dir, or a
            .jsonl / .parquet / .txt file. Its ``id`` column (else the row number) is each
            row's ``seed_id``. Needed unless ``unseeded``.
        unseeded: the control: prompt every document with an empty d1 (``BOS SEP``), no
            seeds; ``seed_id`` is -1.
        num_samples: synthetic documents to write (seeds are drawn with replacement).
        max_new_tokens: length cap of each synthetic document, EOS included.
        temperature: sampling temperature (> 0).
        top_p: nucleus mass; 1.0 turns it off.
        top_k: keep the k most likely tokens; 0 turns it off.
        batch_size: prompts decoded together; a finished row takes the next prompt at once.
        seed: base seed (0..2**63-1): sample i's seed document and tokens come from (seed, i).
        num_subsets: K disjoint subsets (row i gets subset i mod K), one student per subset.
        shard_size: rows per parquet shard, the unit of resuming and of splitting over ranks.
        separator: text between d1 and d2; None takes the one the synthesizer's export
            records (an export without one needs it given).
        max_d1_tokens: d1 is cut to this many tokens; None takes the export's.
        seeds_subset: draw seeds from subset k of ``seeds`` only (0..K-1), as
            ``--data.subset`` selects it; None draws from every document.
        seeds_num_subsets: K for ``seeds_subset``; None takes the corpus's own ``subset``
            column, another K takes row i into subset i mod K.
        dtype: float32, bfloat16 or float16 for the synthesizer's weights, or auto (bfloat16
            where the device computes it natively, else float32; recorded as resolved).
        device: "auto" (this rank's CUDA device if there is one), "cpu" or "cuda[:N]".
        host_every: decoding steps between two looks of the host at the batch; unset: 1 on
            a CPU, 8 on a GPU (documents are the same for every value).
        cuda_graph: replay each decoding step as a captured CUDA graph (a GPU only).
        overwrite: replace an existing corpus written with other settings.

    Returns:
        The corpus dir.
    """
    _validate(synthesizer, num_samples, max_new_tokens, temperature, top_p, top_k, batch_size,
              seed, num_subsets, shard_size, max_d1_tokens, dtype, device, host_every,
              cuda_graph)
    refuse_first_failed([
        (unseeded or seeds is not None, "--seeds: give the real corpus the seed documents are "
                                        "drawn from, or --unseeded true for the control"),
        (not unseeded or seeds is None and seeds_subset is None and seeds_num_subsets is None,
         "--unseeded true: the control reads no seeds; drop --seeds, --seeds_subset and "
         "--seeds_num_subsets")])
    dtype = weight_dtype(dtype, pick_device(device))  # auto: the manifest records what ran
    layout = (export_info(synthesizer) or {}).get("pair_layout") or {}
    for flag, given, trained in (("--separator", separator, layout.get("separator")),
                                 ("--max_d1_tokens", max_d1_tokens, layout.get("max_d1_tokens"))):
        if given is not None and trained is not None and given != trained:
            log.warning("%s %r differs from the %r the synthesizer was trained with: its "
                        "prompts will not look like its training rows", flag, given, trained)
    separator = layout.get("separator") if separator is None else separator
    max_d1_tokens = layout.get("max_d1_tokens") if max_d1_tokens is None else max_d1_tokens
    if separator is None or max_d1_tokens is None:
        missing = "--separator" if separator is None else "--max_d1_tokens"
        raise SelftrainError(f"{missing}: --synthesizer {synthesizer} records no pair layout "
                             "(it is not an export of `selftrain fit` on a pairs dir); give "
                             f"{missing} as the synthesizer was trained")
    target = Path(out)
    refuse_input_overlap(target, [("--synthesizer", synthesizer)]
                         + ([("--seeds", seeds)] if seeds is not None else []))
    if unseeded:  # one empty seed document: every prompt is BOS SEP
        seed_ids, seed_texts = [UNSEEDED], [""]
    else:
        seed_ids, seed_texts = corpus_documents(seeds, "--seeds", seeds_subset,
                                                seeds_num_subsets, "--seeds_subset")
        if not seed_texts:
            raise SelftrainError(f"--seeds {seeds}: no non-empty document to condition on")
    flags = {"synthesizer": synthesizer,
             # only when set: corpora written before the control existed keep their settings
             **({"unseeded": True} if unseeded else {}),
             "seeds": None if unseeded else str(Path(seeds).resolve()),
             "seeds_sha256": _seeds_digest(seed_ids, seed_texts), "seeds_subset": seeds_subset,
             "seeds_num_subsets": seeds_num_subsets,
             "seed_documents": len(seed_texts), "num_samples": num_samples,
             "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
             "top_k": top_k, "seed": seed, "num_subsets": num_subsets,
             "shard_size": shard_size, "separator": separator,
             "max_d1_tokens": max_d1_tokens, "dtype": dtype, "version": SYNTHESIZER_VERSION}
    ShardedCorpus(target, flags, num_samples, shard_size).check(overwrite, compare=FLAG_KEYS)

    torch_device = pick_device(device)
    rank, world = init_distributed(torch_device)
    tokenizer = load_tokenizer(synthesizer, flag="--synthesizer")
    sep_ids = separator_ids(tokenizer, separator, "--separator")
    model = load_model(synthesizer, dtype=dtype, flag="--synthesizer").to(torch_device).eval()
    record = source_provenance(synthesizer, tokenizer, model, layout.get("bos_token_id"),
                               flag="--synthesizer")
    _check_length(model, sep_ids, max_d1_tokens, max_new_tokens)
    corpus = ShardedCorpus(target, {**flags, **resolved_spec(synthesizer, record)}, num_samples,
                           shard_size, schema=SBP_SCHEMA)
    decoder = PromptedDecoder(model, record["eos_token_id"], batch_size, temperature=temperature,
                              seed=seed, top_k=top_k, top_p=top_p, vocab_size=len(tokenizer),
                              decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                              host_every=host_every, cuda_graph=cuda_graph)
    seeding = SeedPrompts(seed, seed_ids, seed_texts, sep_ids, record["bos_token_id"],
                          max_d1_tokens)
    manifest = {"kind": "sbp", **record, "seed": seed, "num_subsets": num_subsets,
                "decontamination": None,
                "seeds": None if unseeded else {
                    "corpus": str(seeds), "documents": len(seed_texts), "subset": seeds_subset,
                    "num_subsets": seeds_num_subsets,
                    "draw": "uniform with replacement, seed document of sample i from (seed, i)"},
                "pair_layout": {"separator": separator, "max_d1_tokens": max_d1_tokens},
                "sampling": {"temperature": temperature, "top_p": top_p, "top_k": top_k,
                             "max_new_tokens": max_new_tokens, "dtype": dtype,
                             "sampler": SYNTHESIZER_VERSION}}
    rows_of = partial(_rows, decoder, tokenizer, seeding=seeding, max_new_tokens=max_new_tokens,
                      num_subsets=num_subsets, source=synthesizer)
    try:
        path = fill_corpus(corpus, rows_of, manifest, overwrite, rank, world,
                           progress="synthesize", unit="doc")
    except KeyboardInterrupt as interrupt:
        raise Interrupted(f"interrupted after {corpus.complete_shards()} of {corpus.num_shards} "
                          "shards; rerun the same command to resume") from interrupt
    return path or corpus.out


def _seeds_digest(ids: list[int], texts: list[str]) -> str:
    """A short hash of the seed documents (ids and texts), so edited seeds never resume."""
    digest = hashlib.sha256()
    for key, text in zip(ids, texts, strict=True):
        digest.update(f"{key}\0{text}\0".encode())
    return digest.hexdigest()[:16]


def _check_length(model, sep_ids: list[int], max_d1_tokens: int, max_new_tokens: int) -> None:
    """Refuse prompts plus documents longer than the synthesizer's context, before writing."""
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = 1 + max_d1_tokens + len(sep_ids) + max_new_tokens
    if context is not None and longest > context:
        raise SelftrainError(f"--max_new_tokens {max_new_tokens}: BOS, {max_d1_tokens} tokens of "
                             f"d1 (--max_d1_tokens), the {len(sep_ids)}-token separator and the "
                             f"new document make {longest} tokens, more than the synthesizer's "
                             f"context ({context}); lower --max_new_tokens or --max_d1_tokens")


def seed_row(seed: int, sample: int, documents: int) -> int:
    """The row of sample ``sample``'s seed document, drawn uniformly from (seed, sample) alone.

    Args:
        seed: ``--seed``.
        sample: the sample id.
        documents: seed documents to draw from.
    """
    return int(np.random.default_rng([seed, sample]).integers(documents))


@dataclass
class SeedPrompts:
    """The seed documents, and each sample's prompt ``BOS d1 SEP`` built from its seed.

    Args:
        seed: ``--seed`` (draws each sample's seed document).
        ids: the seed documents' ids.
        texts: their texts.
        sep_ids: the separator's token ids.
        bos_id: the BOS id.
        max_d1_tokens: d1 is cut to this many tokens.
    """

    seed: int
    ids: list[int]
    texts: list[str]
    sep_ids: list[int]
    bos_id: int
    max_d1_tokens: int

    def prompts(self, samples: list[int], tokenizer, max_new_tokens: int
                ) -> tuple[list[Prompt], dict[int, int]]:
        """The prompts of ``samples`` and each sample's seed id.

        Args:
            samples: sample ids.
            tokenizer: the synthesizer's tokenizer (each seed used is tokenized once).
            max_new_tokens: every prompt's length cap.
        """
        rows = {i: seed_row(self.seed, i, len(self.texts)) for i in samples}
        used = sorted(set(rows.values()))
        encoded = tokenizer([self.texts[r] for r in used], add_special_tokens=False)["input_ids"]
        by_row = dict(zip(used, encoded, strict=True))
        prompts = [Prompt(id=i, tokens=prompt_ids(by_row[rows[i]], self.sep_ids, self.bos_id,
                                                  self.max_d1_tokens),
                          max_new_tokens=max_new_tokens) for i in samples]
        return prompts, {i: self.ids[row] for i, row in rows.items()}


def _rows(decoder: PromptedDecoder, tokenizer, ids: list[int], *, seeding: SeedPrompts,
          max_new_tokens: int, num_subsets: int, source: str
          ) -> Iterator[dict[str, Any]]:
    """Synthesize the given ids: each document's corpus row, with its seed document's id.

    ``seed_id``: the seed document it was conditioned on. The prompts are built before the first
    document is decoded.

    Args:
        decoder: the synthesizer's prompted decoder.
        tokenizer: the synthesizer's tokenizer.
        ids: the sample ids to synthesize.
        seeding: the seed documents and prompts.
        max_new_tokens: the length cap of each document.
        num_subsets: K; row i goes to subset i mod K.
        source: the synthesizer's spec, written in every row.
    """
    prompts, seed_of = seeding.prompts(ids, tokenizer, max_new_tokens)
    return (sampled_row(done.id, done.tokens, done.reason == "eos", seeding.bos_id, tokenizer,
                        num_subsets, source, seed_id=seed_of[done.id])
            for done in decoder.generate(prompts))


def _validate(synthesizer: str, num_samples: int, max_new_tokens: int, temperature: float,
              top_p: float, top_k: int, batch_size: int, seed: int, num_subsets: int,
              shard_size: int, max_d1_tokens: int | None, dtype: str, device: str,
              host_every: int | None, cuda_graph: bool) -> None:
    """Refuse bad flags before anything is loaded or written (see :func:`synthesize`)."""
    parse_model_spec(synthesizer, flag="--synthesizer")
    check_seed(seed, "--seed")
    as_dtype(dtype, "--dtype")
    target = pick_device(device)
    check_sampling(num_samples, max_new_tokens, [temperature], top_p, top_k, batch_size,
                   num_subsets, shard_size,
                   more=[(max_d1_tokens is None or max_d1_tokens >= 1,
                          f"--max_d1_tokens {max_d1_tokens}: must be >= 1"),
                         *decoding_checks(host_every, cuda_graph, target.type)])
