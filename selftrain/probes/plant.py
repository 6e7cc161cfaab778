"""`selftrain plant`: give a base model verbatim memories the probes can then watch fade.

The memorization claim needs a base that has memorized held-out text. Pythia has such text
from pretraining; a small CPU model does not (the embedded SmolLM2-135M extracts almost none
of its candidate windows). This command makes the controlled equivalent: it fine-tunes the
base on canary windows (a probe set, typically ``selftrain probeset --keep all`` over license
files and Python source) until the given share of them is extracted exactly, then writes

- ``<out>/model``: the planted model (HF weights + tokenizer), the base of the experiment;
- ``<out>/probes.parquet``: the canaries it extracts, the extraction and likelihood probe set;
- ``<out>/plant.json``: settings, epochs, loss and extraction counts per epoch.

Exact extraction is checked each epoch teacher-forced (one forward pass: greedy decoding
reproduces the suffix iff the argmax at every suffix position is the true token); the final
probe set is confirmed with real greedy decoding.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from selftrain.corpus import refuse_file_path
from selftrain.errors import SelftrainError
from selftrain.models import load_model, load_tokenizer, parse_model_spec, tokenizer_fingerprint
from selftrain.probes.probeset import summarize, write_probe_set
from selftrain.probes.windows import greedy_continuations, load_probe_set, read_probe_rows

log = logging.getLogger(__name__)


@torch.no_grad()
def extracted_teacher_forced(model: torch.nn.Module, input_ids: torch.Tensor,
                             prefix_tokens: int, batch_size: int) -> torch.Tensor:
    """``[N]`` bool: greedy decoding from the prefix reproduces the rest exactly."""
    out = []
    for start in range(0, len(input_ids), batch_size):
        ids = input_ids[start:start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, prefix_tokens - 1:-1]
        out.append((logits.argmax(-1) == ids[:, prefix_tokens:]).all(dim=1))
    return torch.cat(out)


def plant(
    model: str,
    canaries: str,
    out: str,
    prefix_tokens: int = 32,
    suffix_tokens: int = 32,
    target: float = 1.0,
    max_epochs: int = 40,
    lr: float = 1e-4,
    batch_size: int = 8,
    bf16: bool = True,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Fine-tune ``model`` on the canaries until ``target`` of them are extracted.

    Args:
        model: the base model spec.
        canaries: probe-set parquet/jsonl of windows to plant (``selftrain probeset --keep all``).
        out: output dir (``model/``, ``probes.parquet``, ``plant.json``).
        prefix_tokens: prefix length of the probe.
        suffix_tokens: continuation length of the probe.
        target: stop once this share of canaries is extracted exactly (0 < target <= 1).
        max_epochs: give up after this many passes (the probe set then holds what was planted).
        lr: AdamW learning rate (constant).
        batch_size: canaries per optimizer step.
        bf16: bf16 autocast for the forward passes (weights stay fp32).
        seed: order of the canaries.
        overwrite: replace an existing ``out``.
    """
    parse_model_spec(model, flag="--model")
    if not 0 < target <= 1:
        raise SelftrainError(f"--target {target}: must be in (0, 1]")
    if max_epochs < 1 or lr <= 0 or batch_size < 1:
        raise SelftrainError("--max_epochs and --batch_size must be >= 1 and --lr > 0")
    root = Path(out)
    refuse_file_path(root)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise SelftrainError(f"--out {out} exists and is not empty; pass --overwrite true")
    tokenizer = load_tokenizer(model)
    probes = load_probe_set(canaries, tokenizer, prefix_tokens, suffix_tokens, flag="--canaries")
    columns, _ = read_probe_rows(canaries, "--canaries")
    lm = load_model(model)
    device_type = next(lm.parameters()).device.type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    ids, history, start = probes.input_ids, [], time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        lm.train()
        losses = []
        for batch in torch.randperm(len(ids), generator=generator).split(batch_size):
            with autocast:
                loss = lm(input_ids=ids[batch], labels=ids[batch], use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        lm.eval()
        with autocast:
            hit = extracted_teacher_forced(lm, ids, prefix_tokens, batch_size * 4)
        share = float(hit.float().mean())
        history.append({"epoch": epoch, "loss": round(sum(losses) / len(losses), 4),
                        "extracted": int(hit.sum())})
        log.info(f"plant epoch {epoch}: loss {history[-1]['loss']:.3f}, extracted "
                 f"{int(hit.sum())}/{len(ids)} ({time.perf_counter() - start:.0f} s)")
        if share >= target:
            break
    else:
        log.warning(f"plant: {share:.0%} of canaries extracted after {max_epochs} epochs "
                    f"(< --target {target}); raise --max_epochs or --lr")
    with autocast:
        greedy = greedy_continuations(lm, probes.prefixes, suffix_tokens, batch_size * 4)
    matched = (greedy == probes.suffixes).sum(1).tolist()
    rows = [{"domain": probes.domains[int(d)], "text": tokenizer.decode(row.tolist()),
             "input_ids": row.tolist(), "source": (columns.get("source") or [None] * len(ids))[i],
             "matched_tokens": count, "memorized": count == suffix_tokens}
            for i, (row, d, count) in enumerate(zip(ids, probes.domain_index, matched,
                                                   strict=True))]
    kept = [row for row in rows if row["memorized"]]
    if not kept:
        raise SelftrainError(f"plant: no canary is extractable after {len(history)} epochs; "
                             "raise --lr or --max_epochs")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".plant-", dir=root.parent))
    try:
        lm.save_pretrained(staging / "model", safe_serialization=True)
        tokenizer.save_pretrained(staging / "model")
        summary = summarize(rows, suffix_tokens)
        write_probe_set(kept, staging / "probes.parquet", {
            "model": str(root / "model"), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "prefix_tokens": prefix_tokens, "suffix_tokens": suffix_tokens, "keep": "memorized",
            "planted_from": canaries, "candidates": summary})
        (staging / "plant.json").write_text(json.dumps({
            "base": model, "canaries": canaries, "lr": lr, "batch_size": batch_size,
            "bf16": bf16, "seed": seed, "target": target, "epochs": history,
            "extracted": summary, "seconds": round(time.perf_counter() - start, 1)},
            indent=2) + "\n")
        shutil.rmtree(root)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(f"plant: {len(kept)}/{len(rows)} canaries extracted; wrote {root}")
    return root
