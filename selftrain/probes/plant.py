"""`selftrain plant`: give a base model verbatim memories the probes can then watch fade.

The memorization claim needs a base that has memorized held-out text. Pythia has such text
from pretraining; a small CPU model does not (the embedded SmolLM2-135M extracts almost none
of its candidate windows). This command makes the controlled equivalent: it fine-tunes the
base on canary windows (a probe set, typically ``selftrain probeset --keep all`` over license
files and Python source) until the given share of them is extracted exactly, then writes

- ``<out>/model``: the planted model (HF weights + tokenizer), the base of the experiment;
- ``<out>/probes.parquet``: the canaries it extracts, the extraction and likelihood probe set;
- ``<out>/plant.json``: settings, epochs, loss and extraction counts per epoch, the rehearsal
  and the damage gate's figures.

Planting must leave the rest of the base as it was, or every later "gain" is partly repair.
So the canaries are trained in among rehearsal text: by default BOS samples of the unplanted
base itself, drawn with the project's sampler, or any corpus (``--rehearsal``; a large corpus of
real text is drawn afresh every epoch, as pretraining text would be). Each canary sits
inside a rehearsal document at a random offset (never right after BOS, so the canaries do not
become the model's start of text, which its BOS samples would then reproduce), drawn afresh
every epoch, and ``rehearsal_ratio`` rehearsal documents per canary are trained on beside
them. By default a canary row is trained on the canary's continuation only
(``--canary_loss continuation``): extraction asks for the continuation given the prefix, and
teaching the prefix and the document around it as text to produce is damage with no use.
A damage gate (:mod:`selftrain.probes.damage`) then compares the base before and after on
lm-eval tasks (held-out bits per byte, benchmarks) and refuses to publish a planted model that
got worse than allowed.

The three outputs appear together: the dir is filled beside ``<out>`` and swapped in
(:func:`selftrain.io.atomic_dir`); a plant that fails the gate writes nothing.

Exact extraction is checked each epoch teacher-forced on the windows alone (one forward pass:
greedy decoding reproduces the suffix iff the argmax at every suffix position is the true
token); the final probe set is confirmed with real greedy decoding.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from selftrain.corpus import read_corpus
from selftrain.digests import write_dir_digests
from selftrain.errors import SelftrainError
from selftrain.inputs import check_seed
from selftrain.io import atomic_dir, write_json_atomic
from selftrain.models import (
    load_model,
    load_tokenizer,
    pad_token_id,
    parse_model_spec,
    tokenizer_fingerprint,
)
from selftrain.outputs import check_out_dir, refuse_input_overlap
from selftrain.precision import autocast_dtype
from selftrain.probe_file import read_probe_rows
from selftrain.probes.damage import DamageGate, failure_line, judge, score_tasks
from selftrain.probes.probeset import summarize, write_probe_set
from selftrain.probes.windows import ProbeSet, greedy_continuations, load_probe_set
from selftrain.sampling.generate import generate
from selftrain.training.batching import pad_collate
from selftrain.training.rows import retokenize, reuse_ids, stored_ids

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
    rehearsal: str | None = None,
    rehearsal_ratio: float = 1.0,
    rehearsal_tokens: int = 32,
    rehearsal_loss: Literal["nll", "kl"] = "nll",
    canary_loss: Literal["continuation", "window"] = "continuation",
    gate: DamageGate = DamageGate(),  # noqa: B008 (never mutated; jsonargparse lists its flags)
    precision: Literal["auto", "32", "bf16"] = "auto",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Fine-tune ``model`` on the canaries, among rehearsal text, until ``target`` are extracted.

    Args:
        model: the base model spec.
        canaries: probe-set parquet/jsonl of windows to plant (``selftrain probeset --keep all``).
        out: output dir (``model/``, ``probes.parquet``, ``plant.json``).
        prefix_tokens: prefix length of the probe.
        suffix_tokens: continuation length of the probe.
        target: stop once this share of canaries is extracted exactly (0 < target <= 1).
        max_epochs: give up after this many passes (the probe set then holds what was planted).
        lr: AdamW learning rate (constant).
        batch_size: rows per optimizer step.
        rehearsal: corpus dir or .jsonl / .parquet / .txt file of rehearsal documents; None:
            BOS samples of the unplanted base, drawn with the project's sampler.
        rehearsal_ratio: rehearsal documents trained on beside each canary every epoch (>= 0);
            each canary also sits inside a rehearsal document.
        rehearsal_tokens: tokens per rehearsal document (BOS samples are drawn this long;
            longer documents are cut).
        rehearsal_loss: what the rehearsal documents are trained on: ``nll`` (their tokens,
            like the canaries) or ``kl`` (at every position, KL(unplanted || planted) over
            the whole vocabulary: the unplanted model's next-token distributions, not the
            sampled tokens, so the rehearsal holds the model where it was instead of teaching
            it its own samples; costs a frozen copy of the base and its forward pass).
        canary_loss: what a canary row is trained on: ``continuation`` (the canary's
            ``suffix_tokens`` given everything before them; the row ends with the canary) or
            ``window`` (every token of the row: the document around the canary and the whole
            window).
        gate: the damage gate: lm-eval tasks scored before and after planting (``--gate.tasks``,
            ``--gate.include_path``, ``--gate.limit``, ``--gate.tolerance``,
            ``--gate.allow_damage``); no tasks: no gate.
        precision: the forward passes' compute: ``auto`` (bf16 autocast where the device
            computes bf16 natively, else float32), ``32`` or ``bf16`` (weights stay fp32);
            ``plant.json`` records what ran.
        seed: order of the rows, rehearsal draws and canary offsets (0..2**63-1).
        overwrite: replace an existing ``out``.
    """
    check_settings(model, target, max_epochs, lr, batch_size, prefix_tokens, suffix_tokens,
                   seed)
    check_rehearsal(rehearsal, rehearsal_ratio, rehearsal_tokens)
    gate = gate or DamageGate()
    gate.check()
    root = output_dir(out, overwrite, [("--model", model), ("--canaries", canaries),
                                       *([("--rehearsal", rehearsal)] if rehearsal else [])])
    tokenizer = load_tokenizer(model, flag="--model")
    probes = load_probe_set(canaries, tokenizer, prefix_tokens, suffix_tokens, flag="--canaries")
    sources = read_probe_rows(canaries, "--canaries")[0].get("source") or [None] * len(probes)
    units = gate.load() if gate.tasks else {}
    start = time.perf_counter()
    pool_size = len(probes) + round(rehearsal_ratio * len(probes))
    documents, rehearsal_record = rehearsal_documents(
        model, tokenizer, rehearsal, pool_size, rehearsal_tokens, precision, seed)
    lm = load_model(model, flag="--model")
    device = next(lm.parameters()).device
    compute = autocast_dtype(precision, device)
    autocast = torch.autocast(device.type, dtype=compute or torch.float32,
                              enabled=compute is not None)
    with autocast:
        before = score_tasks(lm, tokenizer, units, gate, seed) if units else {}
    history = train_until_extracted(lm, probes, target, max_epochs, lr, batch_size, seed,
                                    autocast, documents, rehearsal_ratio, pad_token_id(tokenizer),
                                    rehearsal_loss, canary_loss)
    rows = confirm_by_greedy_decoding(lm, probes, tokenizer, sources, batch_size, autocast)
    kept = extracted_rows(rows, epochs=len(history))
    summary = summarize(rows, suffix_tokens)
    verdict = None
    if units:
        with autocast:
            verdict = judge(before, score_tasks(lm, tokenizer, units, gate, seed),
                            gate.tolerance)
        log.info("plant: damage gate %s: %s", "passed" if verdict["passed"] else "FAILED",
                 "; ".join(f"{name} {m['before']:.4g} -> {m['after']:.4g}"
                           for name, m in verdict["metrics"].items()))
        if not verdict["passed"] and not gate.allow_damage:
            raise SelftrainError(failure_line(verdict))
    probe_metadata = {
        "model": str(root / "model"), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "prefix_tokens": prefix_tokens, "suffix_tokens": suffix_tokens, "keep": "memorized",
        "planted_from": canaries, "candidates": summary}
    record = {"base": model, "canaries": canaries, "lr": lr, "batch_size": batch_size,
              "precision": "bf16" if compute is not None else "32", "seed": seed,
              "target": target, "canary_loss": canary_loss,
              "rehearsal": {**rehearsal_record, "loss": rehearsal_loss},
              "gate": None if verdict is None else {
                  **verdict, "tasks": dict(gate.tasks), "limit": gate.limit,
                  "allow_damage": gate.allow_damage},
              "epochs": history, "extracted": summary}
    write_output(root, lm, tokenizer, kept, probe_metadata, record, started=start)
    log.info(f"plant: {len(kept)}/{len(rows)} canaries extracted; wrote {root}")
    return root


def check_rehearsal(rehearsal: str | None, ratio: float, tokens: int) -> None:
    """Refuse bad rehearsal settings in one line, before anything is loaded.

    Args:
        rehearsal: ``--rehearsal`` (None: BOS samples of the base).
        ratio: rehearsal documents per canary (>= 0).
        tokens: tokens per rehearsal document (>= 2).
    """
    if not ratio >= 0:
        raise SelftrainError(f"--rehearsal_ratio {ratio}: must be >= 0 (rehearsal documents "
                             "per canary)")
    if tokens < 2:
        raise SelftrainError(f"--rehearsal_tokens {tokens}: must be >= 2 (a canary goes inside "
                             "a document, after its BOS and at least one token)")
    if rehearsal is not None and not Path(rehearsal).exists():
        raise SelftrainError(f"--rehearsal {rehearsal}: no such file or directory; give a "
                             "corpus dir or a .jsonl / .parquet / .txt file, or leave it unset "
                             "for BOS samples of the base")


def rehearsal_documents(model: str, tokenizer, rehearsal: str | None, count: int, tokens: int,
                        precision: str, seed: int) -> tuple[list[list[int]], dict[str, Any]]:
    """The rehearsal documents as token ids (BOS first, at most ``tokens`` after it).

    Args:
        model: the base (sampled from when ``rehearsal`` is None).
        tokenizer: its tokenizer.
        rehearsal: a corpus dir or file, or None.
        count: BOS samples to draw (a given corpus is taken whole).
        tokens: tokens per document after BOS.
        precision: ``--precision`` (the sampler's weights follow it).
        seed: the sampler's seed.

    Returns:
        The documents and what ``plant.json`` records about them.
    """
    flag = "--rehearsal"
    if rehearsal is None:
        dtype = {"auto": "auto", "32": "float32", "bf16": "bfloat16"}[precision]
        with tempfile.TemporaryDirectory(prefix="selftrain-rehearsal-") as scratch:
            (path,) = generate(model=model, out=str(Path(scratch) / "bos"),
                               num_samples=max(count, 1), max_new_tokens=tokens,
                               temperature=1.0, batch_size=min(64, max(count, 1)), seed=seed,
                               dtype=dtype)
            corpus = read_corpus(path, flag=flag)
            ids = stored_ids(corpus, list(range(len(corpus))), len(tokenizer), str(path), flag)
        source = f"BOS samples of {model} (T=1.0, seed {seed})"
    else:
        corpus = read_corpus(rehearsal, flag=flag)
        keep = list(range(len(corpus)))
        fingerprint = tokenizer_fingerprint(tokenizer)
        ids = (stored_ids(corpus, keep, len(tokenizer), rehearsal, flag)
               if reuse_ids(corpus, None, lambda: fingerprint, rehearsal, flag)
               else retokenize(corpus, keep, tokenizer, None, rehearsal, flag))
        source = str(rehearsal)
    documents = [list(row[:tokens + 1]) for row in ids if len(row) >= 2]
    if not documents:
        raise SelftrainError(f"{flag} {rehearsal or model}: no rehearsal document has a token "
                             "after its BOS; give a corpus with text")
    return documents, {"source": source, "documents": len(documents), "tokens": tokens,
                       "placement": "each canary inside a rehearsal document, after at least "
                                    "one token of it, at a random offset drawn every epoch"}


def check_settings(model: str, target: float, max_epochs: int, lr: float, batch_size: int,
                   prefix_tokens: int = 32, suffix_tokens: int = 32, seed: int = 0) -> None:
    """Refuse a bad model spec or out-of-range settings before anything is loaded.

    Args:
        model: the base model spec.
        target: share of canaries to extract, in (0, 1].
        max_epochs: passes at most (>= 1).
        lr: learning rate (> 0).
        batch_size: canaries per step (>= 1).
        prefix_tokens: prefix length (>= 1).
        suffix_tokens: continuation length (>= 1).
        seed: order of the canaries (0..2**63-1).
    """
    parse_model_spec(model, flag="--model")
    check_seed(seed, "--seed")
    if not 0 < target <= 1:
        raise SelftrainError(f"--target {target}: must be in (0, 1]")
    for flag, value in (("--max_epochs", max_epochs), ("--batch_size", batch_size),
                        ("--prefix_tokens", prefix_tokens), ("--suffix_tokens", suffix_tokens)):
        if value < 1:
            raise SelftrainError(f"{flag} {value}: must be >= 1")
    if not lr > 0:
        raise SelftrainError(f"--lr {lr}: must be > 0")


PLANT_ENTRIES = ("plant.json", "model", "probes.parquet")
"""What a plant output dir holds; ``plant.json`` marks it as one."""


def output_dir(out: str, overwrite: bool, inputs: list[tuple[str, str]]) -> Path:
    """The output dir, refused if ours to write it is not (:mod:`selftrain.outputs`).

    That is: a file, a dir that is or holds an input, one that holds anything but an earlier
    plant output, or one that holds such an output while ``overwrite`` is off.

    Args:
        out: ``--out``.
        overwrite: ``--overwrite``.
        inputs: (flag, path) of what plant reads (the base model, the canaries).
    """
    root = Path(out)
    refuse_input_overlap(root, inputs)
    check_out_dir(root, overwrite, PLANT_ENTRIES[:1], PLANT_ENTRIES, "planted model")
    return root


def train_until_extracted(lm: torch.nn.Module, probes: ProbeSet, target: float,
                          max_epochs: int, lr: float, batch_size: int, seed: int,
                          autocast: AbstractContextManager,
                          documents: list[list[int]] | None = None, ratio: float = 0.0,
                          pad_id: int = 0, rehearsal_loss: Literal["nll", "kl"] = "nll",
                          canary_loss: Literal["continuation", "window"] = "continuation"
                          ) -> list[dict]:
    """Fine-tune on the canaries among rehearsal text until ``target`` are extracted.

    Args:
        lm: the base model, trained in place.
        probes: the canaries.
        target: share of canaries to extract.
        max_epochs: passes at most; a warning says so when the target is not met.
        lr: AdamW learning rate (constant, no weight decay).
        batch_size: rows per optimizer step.
        seed: order of the rows, documents and offsets.
        autocast: the forward passes' autocast context.
        documents: rehearsal documents (BOS first); None: the canary windows alone.
        ratio: rehearsal documents trained on beside each canary every epoch.
        pad_id: the padding id (masked out of the loss).
        rehearsal_loss: ``nll`` (rehearsal rows trained on their tokens) or ``kl`` (on
            KL(unplanted || planted) at each position, against a frozen copy of ``lm``).
        canary_loss: ``continuation`` (canary rows trained on the canary's continuation
            only) or ``window`` (on every token).

    Returns:
        Per epoch: ``epoch``, mean ``loss`` (the objective per position: canary-row token
        NLL and rehearsal-row NLL or KL), ``rehearsal_kl`` under ``kl``, ``rows`` and the
        number ``extracted``.
    """
    reference = None
    if rehearsal_loss == "kl" and documents and ratio > 0:
        reference = copy.deepcopy(lm).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    ids, history, start = probes.input_ids, [], time.perf_counter()
    continuation_from = probes.prefix_tokens if canary_loss == "continuation" else None
    for epoch in range(1, max_epochs + 1):
        lm.train()
        losses, divergences = [], []
        rows = epoch_rows(ids.tolist(), documents, ratio, rng, continuation_from)
        for batch in np.array_split(rng.permutation(len(rows)),
                                    max(1, -(-len(rows) // batch_size))):
            inputs = pad_collate([rows[i] for i in batch], pad_id)
            rehearsing = torch.as_tensor([int(i) >= len(ids) for i in batch])
            with autocast:
                if reference is None or not rehearsing.any():
                    loss = lm(**inputs, use_cache=False).loss
                else:
                    loss, divergence = _objective_with_kl(lm, reference, inputs, rehearsing)
                    divergences.append(divergence)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        lm.eval()
        with autocast:
            hit = extracted_teacher_forced(lm, ids, probes.prefix_tokens, batch_size * 4)
        share = float(hit.float().mean())
        history.append({"epoch": epoch, "loss": round(sum(losses) / len(losses), 4),
                        **({"rehearsal_kl": round(sum(divergences) / len(divergences), 5)}
                           if divergences else {}),
                        "rows": len(rows), "extracted": int(hit.sum())})
        log.info(f"plant epoch {epoch}: loss {history[-1]['loss']:.3f}"
                 + (f", rehearsal KL {history[-1]['rehearsal_kl']:.4f}" if divergences else "")
                 + f" over {len(rows)} rows, extracted {int(hit.sum())}/{len(ids)} "
                 f"({time.perf_counter() - start:.0f} s)")
        if share >= target:
            break
    else:
        log.warning(f"plant: {share:.0%} of canaries extracted after {max_epochs} epochs "
                    f"(< --target {target}); raise --max_epochs or --lr")
    return history


def _objective_with_kl(lm: torch.nn.Module, reference: torch.nn.Module,
                      inputs: dict[str, torch.Tensor], rehearsing: torch.Tensor
                      ) -> tuple[torch.Tensor, float]:
    """Token NLL on canary rows and KL(reference || lm) on rehearsal rows, per position.

    Both are summed over the positions that predict a real token and divided by their number,
    so with no rehearsal rows this is the plain mean token NLL.

    Args:
        lm: the model being planted.
        reference: the frozen unplanted model.
        inputs: a padded batch (``input_ids``, ``attention_mask``, ``labels``).
        rehearsing: per row, whether it is a rehearsal document.

    Returns:
        The objective and the mean KL over the rehearsal positions (nats per token).
    """
    log_probs = lm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   use_cache=False).logits[:, :-1].float().log_softmax(-1)
    with torch.no_grad():  # the frozen model reads the rehearsal rows only
        target = reference(input_ids=inputs["input_ids"][rehearsing],
                           attention_mask=inputs["attention_mask"][rehearsing],
                           use_cache=False).logits[:, :-1].float().log_softmax(-1)
    labels = inputs["labels"][:, 1:]
    real = labels != -100
    nll = -log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    kl = (target.exp() * (target - log_probs[rehearsing])).sum(-1)
    per_position = nll.index_put((rehearsing,), kl)
    objective = per_position[real].sum() / real.sum().clamp(min=1)
    divergence = float(kl.detach()[real[rehearsing]].mean())
    return objective, divergence


def epoch_rows(canaries: list[list[int]], documents: list[list[int]] | None, ratio: float,
               rng: np.random.Generator, continuation_from: int | None = None
               ) -> list[dict[str, Any]]:
    """One epoch's training rows: each canary inside a document, then rehearsal documents.

    A canary goes into a document drawn at random, at an offset drawn uniformly from after
    the document's first token past BOS to its end; ``round(ratio * len(canaries))`` more
    documents (without replacement while the pool lasts) are trained on as they are.

    Args:
        canaries: the canary windows.
        documents: rehearsal documents (BOS first); None: the canaries alone.
        ratio: rehearsal documents per canary.
        rng: the plant's generator.
        continuation_from: the prefix length when canary rows are trained on the canary's
            continuation only: the row then ends with the canary and carries ``loss_from``
            (:func:`selftrain.training.batching.pad_collate`); None: every token is trained.

    Returns:
        Rows for :func:`~selftrain.training.batching.pad_collate`, the canary rows first.
    """
    rows = []
    for canary in canaries:
        before, after = [], []
        if documents:
            document = documents[int(rng.integers(len(documents)))]
            offset = int(rng.integers(min(2, len(document)), len(document) + 1))
            before, after = document[:offset], document[offset:]
        if continuation_from is None:
            rows.append({"input_ids": [*before, *canary, *after]})
        else:
            rows.append({"input_ids": [*before, *canary],
                         "loss_from": len(before) + continuation_from})
    extra = round(ratio * len(canaries)) if documents else 0
    order = np.concatenate([rng.permutation(len(documents))
                            for _ in range(-(-extra // len(documents)))]) if extra else []
    rows += [{"input_ids": list(documents[int(i)])} for i in order[:extra]]
    return rows


def confirm_by_greedy_decoding(lm: torch.nn.Module, probes: ProbeSet, tokenizer,
                               sources: list, batch_size: int,
                               autocast: AbstractContextManager) -> list[dict]:
    """Probe rows of every canary, ``memorized`` by real greedy decoding of its suffix.

    Args:
        lm: the planted model (eval mode).
        probes: the canaries.
        tokenizer: the model's tokenizer (decodes ``text``).
        sources: each canary's ``source`` (None where the canary file has none).
        batch_size: canaries per optimizer step (decoding takes four times as many).
        autocast: the forward passes' autocast context.
    """
    with autocast:
        greedy = greedy_continuations(lm, probes.prefixes, probes.suffix_tokens,
                                      batch_size * 4)
    matched = (greedy == probes.suffixes).sum(1).tolist()
    return [{"domain": probes.domains[int(d)], "text": tokenizer.decode(row.tolist()),
             "input_ids": row.tolist(), "source": sources[i], "matched_tokens": count,
             "memorized": count == probes.suffix_tokens}
            for i, (row, d, count) in enumerate(zip(probes.input_ids, probes.domain_index,
                                                   matched, strict=True))]


def extracted_rows(rows: list[dict], epochs: int) -> list[dict]:
    """The rows of the canaries greedy decoding extracts; refuses when there is none.

    Args:
        rows: probe rows from :func:`confirm_by_greedy_decoding`.
        epochs: epochs trained, named in the error.
    """
    kept = [row for row in rows if row["memorized"]]
    if not kept:
        raise SelftrainError(f"plant: no canary is extractable after {epochs} epochs; "
                             "raise --lr or --max_epochs")
    return kept


def write_output(root: Path, lm: torch.nn.Module, tokenizer, kept: list[dict],
                 probe_metadata: dict, record: dict, started: float) -> None:
    """Write ``model/``, ``probes.parquet`` and ``plant.json``: the whole dir appears at once.

    Args:
        root: the output dir; an existing one is replaced once the new one is complete.
        lm: the planted model.
        tokenizer: its tokenizer.
        kept: the probe rows of the extracted canaries.
        probe_metadata: the probe set's selftrain metadata.
        record: ``plant.json``; its ``seconds`` since ``started`` is added once the rest is
            written.
        started: ``time.perf_counter()`` when planting began.
    """
    with atomic_dir(root) as staging:
        lm.save_pretrained(staging / "model", safe_serialization=True)
        tokenizer.save_pretrained(staging / "model")
        write_dir_digests(staging / "model")  # the planted base is checked wherever it loads
        write_probe_set(kept, staging / "probes.parquet", probe_metadata)
        write_json_atomic({**record, "seconds": round(time.perf_counter() - started, 1)},
                          staging / "plant.json")
