"""`selftrain probeset`: build a held-out memorized probe set the way Pythia's was built.

Candidate documents (text or code files, jsonl / parquet with ``text`` and ``domain``) are cut
into non-overlapping windows of ``prefix_tokens + suffix_tokens`` tokens under the model's
tokenizer; each window is probed with a greedy continuation of its prefix, and a window is
kept when the model reproduces its suffix exactly (``--keep memorized``), or kept in any case
(``--keep all``: candidate canaries for ``selftrain plant``). The output is one parquet file in
the probe-set format the extraction and likelihood callbacks read (``domain``, ``text``,
``input_ids``) plus ``source``, ``offset``, ``matched_tokens`` and ``memorized``; the schema
metadata records the model and its tokenizer fingerprint, so students with the same tokenizer
reuse the ids.

Inputs are ``DOMAIN=PATTERN`` (or a bare ``PATTERN`` for jsonl / parquet rows that carry their
own ``domain``). Patterns are globs (``**`` recurses) and may use ``{stdlib}`` (this Python's
standard library) and ``{site_packages}`` (the installed packages), which exist on any machine.
"""

from __future__ import annotations

import json
import logging
import random
import sysconfig
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from selftrain.errors import SelftrainError
from selftrain.inputs import check_rows, check_seed, read_json_records, read_parquet
from selftrain.io import write_parquet_atomic
from selftrain.models import load_model, load_tokenizer, parse_model_spec, tokenizer_fingerprint
from selftrain.outputs import refuse_unwritable
from selftrain.precision import autocast_dtype
from selftrain.probe_file import METADATA_KEY
from selftrain.probes.windows import greedy_continuations

log = logging.getLogger(__name__)

PLACEHOLDERS = {"stdlib": sysconfig.get_paths()["stdlib"],
                "site_packages": sysconfig.get_paths()["purelib"]}


def expand_input(spec: str, flag: str = "--inputs") -> list[tuple[str | None, Path]]:
    """Files named by one ``DOMAIN=PATTERN`` input (domain None: taken from the rows)."""
    domain, _, pattern = spec.rpartition("=") if "=" in spec else (None, "", spec)
    if domain is not None and (not domain or "/" in domain):
        raise SelftrainError(f"{flag} {spec}: the domain before '=' must be non-empty and "
                             "contain no '/'")
    pattern = pattern.format(**PLACEHOLDERS)
    path = Path(pattern)
    if path.is_absolute():
        files = sorted(Path(path.anchor).glob(str(path.relative_to(path.anchor))))
    else:
        files = sorted(Path().glob(pattern))
    files = [file for file in files if file.is_file()]
    if not files:
        raise SelftrainError(f"{flag} {spec}: no file matches {pattern}; check the path")
    return [(domain, file) for file in files]


def read_documents(domain: str | None, path: Path) -> list[tuple[str, str]]:
    """(domain, text) documents of one file: rows of jsonl / parquet, else the whole file.

    Rows are read and checked as a corpus's are (:mod:`selftrain.inputs`): a damaged file, a
    line that is not a JSON object or a ``text`` that is not a string is refused in one line.
    """
    flag = "--inputs"
    if path.suffix in (".jsonl", ".parquet"):
        if path.suffix == ".parquet":
            columns = read_parquet(path, flag, "replace the file or leave it out of "
                                               "--inputs").to_pydict()
            rows = [dict(zip(columns, values, strict=True))
                    for values in zip(*columns.values(), strict=True)]
        else:
            rows = read_json_records(path, flag)
            columns = {"text": [row.get("text") for row in rows]}
        check_rows({"text": columns.get("text", [])}, path, flag)
        if domain is None and any("domain" not in row for row in rows):
            raise SelftrainError(f"--inputs {path}: rows have no 'domain'; write the input as "
                                 "DOMAIN=PATH")
        return [(domain or str(row["domain"]), row.get("text") or "") for row in rows]
    if domain is None:
        raise SelftrainError(f"--inputs {path}: plain files need a domain; write DOMAIN=PATH")
    try:
        return [(domain, path.read_text(encoding="utf-8"))]
    except UnicodeDecodeError:
        return []  # binary files matched by a broad glob are skipped


def candidate_windows(inputs: list[str], tokenizer, window: int, prefix_tokens: int,
                      max_windows: int | None, seed: int) -> list[dict]:
    """Non-overlapping windows per domain, at most ``max_windows`` each (seeded).

    No two windows share a prefix: greedy decoding maps a prefix to one continuation, so of
    two windows with the same prefix (runs of indentation in code, license boilerplate) at
    most one could ever be extracted.
    """
    by_domain: dict[str, list[dict]] = {}
    seen: set[tuple[int, ...]] = set()
    for spec in inputs:
        for domain, path in expand_input(spec):
            for doc, (name, text) in enumerate(read_documents(domain, path)):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                for offset in range(0, len(ids) - window + 1, window):
                    prefix = tuple(ids[offset:offset + prefix_tokens])
                    if prefix in seen:
                        continue
                    seen.add(prefix)
                    by_domain.setdefault(name, []).append(
                        {"domain": name, "source": f"{path}#{doc}", "offset": offset,
                         "input_ids": ids[offset:offset + window]})
    rng = random.Random(seed)
    chosen = []
    for name in sorted(by_domain):
        windows = by_domain[name]
        rng.shuffle(windows)
        chosen += windows if max_windows is None else windows[:max_windows]
    if not chosen:
        raise SelftrainError(f"--inputs: no document has {window} tokens; give longer texts")
    return chosen


def _is_probe_set(path: Path) -> bool:
    """Whether a file is a probe set this project wrote (its schema carries our metadata)."""
    try:
        return METADATA_KEY in (pq.read_schema(path).metadata or {})
    except (OSError, pa.ArrowException):
        return False


def write_probe_set(rows: list[dict], out: Path, metadata: dict) -> None:
    """Write probe rows as parquet with selftrain metadata, atomically.

    Args:
        rows: probe rows (``domain``, ``text``, ``input_ids`` and the probe's own columns).
        out: the parquet file; its parent directories are created.
        metadata: stored as JSON under :data:`METADATA_KEY` in the schema metadata.
    """
    table = pa.Table.from_pylist(rows)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    write_parquet_atomic(table, out)


def probeset(
    model: str,
    inputs: list[str],
    out: str,
    keep: Literal["memorized", "all"] = "memorized",
    prefix_tokens: int = 32,
    suffix_tokens: int = 32,
    max_windows: int | None = 512,
    batch_size: int = 32,
    seed: int = 0,
    precision: Literal["32", "auto", "bf16"] = "32",
    overwrite: bool = False,
) -> Path:
    """Probe candidate windows with a model and write the probe set.

    Args:
        model: the model whose memory is probed (hub id, local dir, embedded:..., tiny:...).
        inputs: ``DOMAIN=PATTERN`` items (globs; ``{stdlib}`` and ``{site_packages}`` expand),
            or ``PATTERN`` for jsonl / parquet rows with their own ``domain``.
        out: the probe-set parquet file to write.
        keep: ``memorized`` keeps the windows the model extracts exactly; ``all`` keeps every
            candidate (canaries to plant with ``selftrain plant``).
        prefix_tokens: prefix length.
        suffix_tokens: continuation length.
        max_windows: candidate windows per domain (>= 1), drawn at random (seeded); None: all.
        batch_size: windows per forward pass.
        seed: which candidates are drawn (0..2**63-1).
        precision: greedy decoding's compute: ``32`` (the default: which windows count as
            memorized does not depend on the machine), ``auto`` (bf16 autocast where the
            device computes bf16 natively, else float32) or ``bf16``; the file records what
            ran.
        overwrite: replace an existing ``out``.
    """
    parse_model_spec(model, flag="--model")
    check_seed(seed, "--seed")
    if max_windows is not None and max_windows < 1:
        raise SelftrainError(f"--max_windows {max_windows}: must be >= 1, or null for every "
                             "candidate window")
    target = Path(out)
    if target.suffix != ".parquet":
        raise SelftrainError(f"--out {out}: the probe set is one .parquet file; name it *.parquet")
    refuse_unwritable(target.parent, beside=False)
    if target.is_dir():
        raise SelftrainError(f"--out {out}: is a directory; name a new *.parquet file")
    if target.exists() and not _is_probe_set(target):
        raise SelftrainError(f"--out {out}: is a file selftrain did not write (no probe-set "
                             "metadata); name a new *.parquet file")
    if target.exists() and not overwrite:
        raise SelftrainError(f"--out {out} exists; pass --overwrite true to replace it")
    for flag, value in (("--prefix_tokens", prefix_tokens), ("--suffix_tokens", suffix_tokens),
                        ("--batch_size", batch_size)):
        if value < 1:
            raise SelftrainError(f"{flag} {value}: must be >= 1")
    tokenizer = load_tokenizer(model, flag="--model")
    rows = candidate_windows(inputs, tokenizer, prefix_tokens + suffix_tokens, prefix_tokens,
                             max_windows, seed)
    lm = load_model(model, flag="--model").eval()
    device = next(lm.parameters()).device
    compute = autocast_dtype(precision, device)
    ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
    matched = torch.empty(len(rows), dtype=torch.long)
    with (tqdm(total=len(rows), unit="window", desc="probeset") as bar,
          torch.autocast(device.type, dtype=compute or torch.float32, enabled=compute is not None)):
        for start in range(0, len(rows), batch_size):
            chunk = ids[start:start + batch_size]
            greedy = greedy_continuations(lm, chunk[:, :prefix_tokens], suffix_tokens,
                                          batch_size)
            matched[start:start + len(chunk)] = (greedy == chunk[:, prefix_tokens:]).sum(1)
            bar.update(len(chunk))
    for row, count in zip(rows, matched.tolist(), strict=True):
        row["text"] = tokenizer.decode(row["input_ids"])
        row["matched_tokens"] = count
        row["memorized"] = count == suffix_tokens
    kept = [row for row in rows if keep == "all" or row["memorized"]]
    summary = summarize(rows, suffix_tokens)
    for name, stats in summary.items():
        log.info(f"probeset {name}: {stats['memorized']} of {stats['windows']} windows "
                 f"extracted, mean match rate {stats['match_rate']:.3f}")
    if not kept:
        raise SelftrainError(f"--model {model} extracts none of {len(rows)} windows, so the "
                             "memorized set is empty; use --keep all and `selftrain plant`, "
                             "or give other inputs")
    write_probe_set(kept, target, {
        "model": model, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "prefix_tokens": prefix_tokens, "suffix_tokens": suffix_tokens, "keep": keep,
        "inputs": inputs, "seed": seed, "precision": "bf16" if compute is not None else "32",
        "candidates": summary})
    log.info(f"probeset: wrote {len(kept)} rows to {target}")
    return target


def summarize(rows: list[dict], suffix_tokens: int) -> dict[str, dict]:
    """Per domain: windows, memorized count and mean match rate."""
    out: dict[str, dict] = {}
    for row in rows:
        stats = out.setdefault(row["domain"], {"windows": 0, "memorized": 0, "match_rate": 0.0})
        stats["windows"] += 1
        stats["memorized"] += int(row["memorized"])
        stats["match_rate"] += row["matched_tokens"] / suffix_tokens
    for stats in out.values():
        stats["match_rate"] = round(stats["match_rate"] / stats["windows"], 4)
    return out
