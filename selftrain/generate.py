"""`selftrain generate`: sample a corpus from a source model's BOS token alone.

No prompt, no chat template, no system text: every row starts as the single resolved BOS id,
and the source samples at a temperature until EOS or ``max_new_tokens``. The ids go straight
to the model (never text), so no tokenizer adds a second BOS. The result is a corpus dir
(see :mod:`selftrain.corpus`) whose manifest records everything needed to sample it again.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from selftrain.corpus import CorpusWriter
from selftrain.errors import SelftrainError
from selftrain.models import (
    load_model,
    load_tokenizer,
    model_revision,
    parse_model_spec,
    resolve_bos_id,
    tokenizer_fingerprint,
)

log = logging.getLogger(__name__)


def generate(
    model: str,
    out: str,
    num_samples: int = 1000,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
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
) -> Path:
    """Sample a corpus from the BOS token of a source model.

    Args:
        model: source model spec: hub id, local HF dir, embedded:smollm2-135m or tiny:<family>.
        out: corpus directory to write (manifest.json + data/*.parquet).
        num_samples: number of sequences to sample.
        max_new_tokens: length cap per sequence, BOS not counted.
        temperature: sampling temperature (> 0); 1.0 samples the model's own distribution.
        top_p: nucleus mass; 1.0 turns it off (pure sampling at the temperature).
        top_k: keep the k most likely tokens; 0 turns it off.
        batch_size: sequences sampled together.
        seed: base seed; batch b is sampled with seed (seed, first id of b).
        num_subsets: K disjoint subsets (row i gets subset i mod K), one student per subset.
        shard_size: rows per parquet shard.
        bos_token_id: override the resolved BOS id.
        dtype: float32, bfloat16 or float16 for the source's weights.
        device: "auto" (CUDA if available), "cpu" or "cuda[:N]".
        overwrite: replace an existing corpus at --out.

    Returns:
        The corpus directory.
    """
    _validate(model, num_samples, max_new_tokens, temperature, top_p, top_k, batch_size,
              num_subsets, shard_size)
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    tokenizer = load_tokenizer(model)
    source = load_model(model, dtype=dtype).to(target).eval()
    bos_id, bos_source = resolve_bos_id(tokenizer, source.config, bos_token_id)
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (
        source.config.eos_token_id)
    # Embedding matrices are often padded past the tokenizer (Qwen2.5: 151,936 rows for 151,665
    # tokens); ids in the padding are not text and must never be sampled.
    unused_ids = list(range(len(tokenizer), source.get_output_embeddings().weight.shape[0]))
    config = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
                              max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                              pad_token_id=eos_id if eos_id is not None else 0, bos_token_id=bos_id,
                              suppress_tokens=unused_ids or None)
    log.info("sampling %d sequences from %s (bos id %d from %s)", num_samples, model, bos_id,
             bos_source)

    counts = {"finished": 0, "tokens": 0}
    start = time.perf_counter()
    with CorpusWriter(Path(out), shard_size=shard_size, overwrite=overwrite) as writer, \
            tqdm(total=num_samples, unit="sample", desc="generate", dynamic_ncols=True) as bar:
        for first in range(0, num_samples, batch_size):
            rows = _sample_batch(source, tokenizer, config, bos_id, eos_id, target,
                                 ids=range(first, min(first + batch_size, num_samples)),
                                 seed=seed, num_subsets=num_subsets, source_name=model)
            writer.add(rows)
            counts["finished"] += sum(row["finished"] for row in rows)
            counts["tokens"] += sum(row["num_tokens"] for row in rows)
            bar.update(len(rows))
            bar.set_postfix(tok_s=f"{counts['tokens'] / (time.perf_counter() - start):.0f}")
        elapsed = time.perf_counter() - start
        manifest = {
            "source": {"model": model, "revision": model_revision(model, source.config),
                       "family": source.config.model_type},
            "tokenizer": {"name": str(tokenizer.name_or_path), "vocab_size": len(tokenizer),
                          "fingerprint": tokenizer_fingerprint(tokenizer)},
            "bos_token_id": bos_id, "bos_source": bos_source, "eos_token_id": eos_id,
            "sampling": {"temperature": temperature, "top_p": top_p, "top_k": top_k,
                         "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                         "dtype": dtype},
            "seed": seed, "num_subsets": num_subsets,
            "counts": {"requested": num_samples, **counts},
            "decontamination": None,
            "timing": {"seconds": round(elapsed, 2),
                       "tokens_per_sec": round(counts["tokens"] / max(elapsed, 1e-9), 1)},
        }
        path = writer.finish(manifest)
    log.info("wrote %d samples (%d tokens, %.0f tokens/s) to %s", writer.rows_written,
             counts["tokens"], counts["tokens"] / max(elapsed, 1e-9), path)
    return path


@torch.inference_mode()
def _sample_batch(model, tokenizer, config: GenerationConfig, bos_id: int, eos_id: int | None,
                  device: torch.device, ids: range, seed: int, num_subsets: int,
                  source_name: str) -> list[dict]:
    torch.manual_seed(seed * 1_000_003 + ids.start)
    prompt = torch.full((len(ids), 1), bos_id, dtype=torch.long, device=device)
    output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                            generation_config=config)
    rows = []
    for sample_id, sequence in zip(ids, output[:, 1:].tolist(), strict=True):
        finished = eos_id is not None and eos_id in sequence
        if finished:
            sequence = sequence[: sequence.index(eos_id) + 1]
        text_ids = sequence[:-1] if finished else sequence
        input_ids = [bos_id, *sequence]
        rows.append({"id": sample_id, "input_ids": input_ids, "num_tokens": len(input_ids),
                     "text": tokenizer.decode(text_ids, skip_special_tokens=True),
                     "finished": finished, "subset": sample_id % num_subsets,
                     "source": source_name})
    return rows


def _validate(model: str, num_samples: int, max_new_tokens: int, temperature: float,
              top_p: float, top_k: int, batch_size: int, num_subsets: int,
              shard_size: int) -> None:
    parse_model_spec(model, flag="--model")
    checks = [
        (num_samples > 0, "--num_samples must be > 0"),
        (max_new_tokens >= 1, "--max_new_tokens must be >= 1"),
        (temperature > 0 and math.isfinite(temperature),
         "--temperature must be > 0 (greedy decoding is not sampling)"),
        (0 < top_p <= 1, "--top_p must be in (0, 1]; 1 turns it off"),
        (top_k >= 0, "--top_k must be >= 0; 0 turns it off"),
        (batch_size >= 1, "--batch_size must be >= 1"),
        (num_subsets >= 1, "--num_subsets must be >= 1"),
        (shard_size >= 1, "--shard_size must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise SelftrainError(message)
