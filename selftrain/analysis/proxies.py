"""`selftrain proxies`: the paper's two intrinsic corpus proxies, a relational one, and the split.

The paper asks whether what one can measure of a corpus before training predicts whether it
helps the student, and finds that it does not. This command measures the two proxies for any
corpus dir so they can be set beside the realised gains:

- **benchmark proximity**: per sample, the largest cosine similarity of its sentence embedding
  (all-MiniLM-L6-v2 by default, :mod:`selftrain.embedding`) to the items of each
  benchmark (read as ``selftrain decontaminate`` reads them; an item's texts joined by
  newlines), and the largest over all benchmarks;
- **student NLL**: per sample, the mean per-token NLL under a student, fed the ids the data
  module would feed it (:mod:`selftrain.analysis.student_nll`);
- **KL(source || student)**, beside the paper's two: utility is a property of the (source,
  student) pair, and this looks at both sides. Where ``selftrain generate`` recorded each sampled
  token's log-probability, per sample ``(log q(x) - log p_student(x))`` per source token,
  q the distribution sampled from (tempered, truncated); its mean over the corpus estimates
  KL(q || student). Corpora without recorded log-probabilities (replay, SBP) get none.

With ``--split_out`` the corpus is also split at the threshold into two corpus dirs,
``below/`` and ``above/`` (a sample is above when its largest similarity is >= the threshold),
that ``selftrain fit --data.corpus`` trains as they are: the paper's control that semantically
distant samples help as much. With ``--cells_out`` (needs ``--student``) it is re-cut into the
four proxy cells (median NLL x median similarity, :mod:`selftrain.analysis.proximity_split`),
so that proxies can be tested within one source. ``summary.json`` gives every subset's mean
of each proxy (``subsets``; with cells, also ``cells``), the per-fit points of a rank test.
The corpus is read a chunk at a time (:mod:`selftrain.analysis.corpus_chunks`); every output
is staged and swapped into place whole.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from selftrain import __version__
from selftrain.analysis.corpus_chunks import ChunkedCorpus, open_corpus
from selftrain.analysis.proximity_split import (
    SPLIT_SIDES,
    cells_record,
    proxy_cells,
    split_record,
    write_cells,
    write_split,
)
from selftrain.analysis.student_nll import StudentNll, source_kl
from selftrain.corpus import check_corpus_out
from selftrain.curation.benchmarks import load_benchmark
from selftrain.embedding import (
    DEFAULT_EMBEDDING_MODEL,
    embed,
    load_embedder,
    max_similarity,
    resolve_embedding_model,
)
from selftrain.errors import SelftrainError, refuse_first_failed
from selftrain.io import atomic_dir, write_json_atomic, write_parquet_atomic
from selftrain.models import parse_model_spec
from selftrain.outputs import check_out_dir, refuse_input_overlap
from selftrain.precision import AUTOCAST_PRECISIONS

log = logging.getLogger(__name__)

FORMAT = "selftrain-proxies/1"
OUT_ENTRIES = ("summary.json", "samples.parquet")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
CHUNK_ROWS = 1024  # samples embedded (and scored) at a time
_PROGRESS_FROM = 1000  # show a progress bar from this many samples


def proxies(
    corpus: str,
    out: str,
    benchmarks: list[str] | str,
    threshold: float = 0.35,
    split_out: str | None = None,
    cells_out: str | None = None,
    embedding_model: str = DEFAULT_EMBEDDING_MODEL,
    student: str | None = None,
    max_length: int = 512,
    precision: str = "auto",
    batch_tokens: int = 4096,
    embed_batch_size: int = 64,
    same_tokenizer: bool | None = None,
    bos_token_id: int | None = None,
    include_path: str | None = None,
    limit: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Benchmark proximity (and student NLL) of every corpus sample; optionally split the corpus.

    Args:
        corpus: corpus dir (or .jsonl / .parquet / .txt file) whose ``text`` is measured.
        out: new directory for ``samples.parquet`` (one row per sample) and ``summary.json``.
        benchmarks: benchmark specs, as ``selftrain decontaminate`` takes them: local .jsonl /
            .json files, local lm-eval task .yaml files, or lm-eval task names whose data is
            local or cached. One, or a list: ``--benchmarks [a.jsonl,hellaswag]``.
        threshold: cosine similarity splitting "below" from "above" (a sample is above when
            its largest similarity over all benchmarks is >= it); in (-1, 1].
        split_out: directory to write the corpus split into, as two corpus dirs ``below/``
            and ``above/`` that ``selftrain fit --data.corpus`` takes; None writes no split.
        cells_out: corpus dir to write the four proxy cells into: every row, its ``subset``
            its cell (0 = low NLL / low similarity, 1 = low / high, 2 = high / low, 3 =
            high / high; medians within the corpus), for ``selftrain fit --data.subset k
            --data.num_subsets 4``; needs ``--student``. None writes no cells.
        embedding_model: sentence-transformers model: ``all-MiniLM-L6-v2`` (bundled by the
            ``proxies`` extra), a local model dir, or a hub id already in the HF cache.
            Nothing is downloaded.
        student: the student's model spec (hub id or local dir, an ``hf/epoch=N`` export,
            ``embedded:smollm2-135m``, ``tiny:qwen2``); adds each sample's mean per-token NLL
            under it. None skips the NLL.
        max_length: tokens per sample, BOS included, fed to the student (as
            ``--data.max_length``); longer samples are cut.
        precision: the student's compute: ``auto`` (bf16 autocast where the device computes
            bf16 natively, else float32), ``32`` or ``bf16``.
        batch_tokens: padded tokens per NLL forward pass (samples are sorted by length and
            batched under this budget); lower it if memory runs out.
        embed_batch_size: texts per embedding forward pass.
        same_tokenizer: whether the corpus ids are the student's (as
            ``--data.same_tokenizer``); None compares tokenizer fingerprints.
        bos_token_id: BOS id put before retokenized text (as ``--data.bos_token_id``); None
            uses the student's.
        include_path: extra directory of lm-eval task YAMLs for task names.
        limit: use at most this many items of each benchmark (None: all).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        overwrite: replace an earlier output at --out (and --split_out).

    Returns:
        The output directory.
    """
    benchmarks = [benchmarks] if isinstance(benchmarks, str) else list(benchmarks)
    target = _validate(locals())
    run_on = _device(device)
    source = open_corpus(corpus)
    if "text" not in source.columns:
        raise SelftrainError(f"--corpus {corpus}: rows have no 'text' column; proximity compares "
                             "text, so decode the ids into a text column first")
    resolve_embedding_model(embedding_model)  # refused in one line before any slow load
    items, specs = _benchmarks(benchmarks, include_path, limit)
    scorer = None if student is None else StudentNll(
        student, source.path, source.manifest, "input_ids" in source.columns, max_length,
        batch_tokens, precision, run_on, same_tokenizer, bos_token_id)
    embedder = load_embedder(embedding_model, run_on)
    started = time.perf_counter()
    bench_vectors = {name: embed(embedder, ["\n".join(item) for item in texts],
                                 embed_batch_size) for name, texts in items.items()}
    log.info("proxies: embedded %d benchmark items in %.1f s",
             sum(map(len, items.values())), time.perf_counter() - started)
    columns, timing = _measure(source, embedder, bench_vectors, scorer, embed_batch_size)
    above = columns["max_similarity"] >= threshold
    summary = _summary(source, columns, items, specs, threshold, embedding_model, student, timing,
                       None if scorer is None else scorer.precision)
    if split_out is not None:
        summary["split"] = split_record(source, above, Path(split_out), threshold)
    summary["subsets"] = subset_means(columns["subset"], columns.get("nll"),
                                      columns["max_similarity"])
    if cells_out is not None:
        cells = proxy_cells(columns["nll"], columns["max_similarity"])
        summary["cells"] = cells_record(cells, columns["nll"], columns["max_similarity"],
                                        Path(cells_out))
        columns["cell"] = cells
    types = {"id": pa.int64(), "subset": pa.int32(), "cell": pa.int32()}
    table = pa.table({name: pa.array(values, type=types.get(name, pa.float64()))
                      for name, values in columns.items()})
    with atomic_dir(target) as staging:
        write_parquet_atomic(table, staging / "samples.parquet")
        write_json_atomic(summary, staging / "summary.json")
        if split_out is not None:  # last: it is swapped in before the output dir is
            write_split(source, above, Path(split_out), threshold, specs, embedding_model)
        if cells_out is not None:
            write_cells(source, columns["cell"], Path(cells_out), summary["cells"])
    log.info("proxies: %d samples, %.1f%% with max similarity >= %s -> %s", source.rows,
             100 * summary["fraction_above"], threshold, target)
    return target


def _validate(arguments: dict[str, Any]) -> Path:
    """Refuse bad flags and outputs before anything is read; the output dir."""
    a = arguments
    if not a["benchmarks"]:
        raise SelftrainError("--benchmarks: none given; pass at least one .jsonl, task .yaml or "
                             "lm-eval task name")
    refuse_first_failed([
        (-1 < a["threshold"] <= 1, f"--threshold {a['threshold']}: must be in (-1, 1] (a cosine "
                                   "similarity; 0.35 is the paper's)"),
        (a["max_length"] >= 2, f"--max_length {a['max_length']}: must be >= 2 (a BOS and a "
                               "token to predict)"),
        (a["batch_tokens"] >= 1, f"--batch_tokens {a['batch_tokens']}: must be >= 1"),
        (a["embed_batch_size"] >= 1, f"--embed_batch_size {a['embed_batch_size']}: must be >= 1"),
        (a["limit"] is None or a["limit"] >= 1, f"--limit {a['limit']}: must be >= 1, or null "
                                                "for every item"),
        (a["precision"] in AUTOCAST_PRECISIONS, f"--precision {a['precision']}: use one of "
                                       f"{', '.join(AUTOCAST_PRECISIONS)}"),
    ])
    if a["student"] is not None:
        parse_model_spec(a["student"], flag="--student")
    out = Path(a["out"])
    inputs = [("--corpus", a["corpus"]), *(("--benchmarks", spec) for spec in a["benchmarks"])]
    refuse_input_overlap(out, inputs)
    check_out_dir(out, a["overwrite"], ("summary.json",), OUT_ENTRIES, "proxies output")
    if a["split_out"] is not None:
        split = Path(a["split_out"])
        if _overlap(split, out):
            raise SelftrainError(f"--split_out {split}: overlaps --out {out}; give them "
                                 "separate directories")
        try:
            refuse_input_overlap(split, inputs)
            check_out_dir(split, a["overwrite"], SPLIT_SIDES, SPLIT_SIDES, "proximity split")
        except SelftrainError as error:  # the same rules as --out, named for this flag
            raise SelftrainError(str(error).replace("--out", "--split_out", 1)) from None
    if a["cells_out"] is not None:
        cells = Path(a["cells_out"])
        if a["student"] is None:
            raise SelftrainError(f"--cells_out {cells}: the cells split at the median student "
                                 "NLL; give --student")
        for flag, other in (("--out", out), ("--split_out", a["split_out"])):
            if other is not None and _overlap(cells, Path(other)):
                raise SelftrainError(f"--cells_out {cells}: overlaps {flag} {other}; give them "
                                     "separate directories")
        try:
            refuse_input_overlap(cells, inputs)
            check_corpus_out(cells, a["overwrite"])
        except SelftrainError as error:
            raise SelftrainError(str(error).replace("--out", "--cells_out", 1)) from None
    return out


def _overlap(first: Path, second: Path) -> bool:
    """Whether one dir is, or lies inside, the other."""
    a, b = first.resolve(), second.resolve()
    return a == b or a in b.parents or b in a.parents


def subset_means(subsets: list[Any], nll: np.ndarray | None, similarity: np.ndarray
                 ) -> list[dict[str, Any]]:
    """Per value of the corpus's ``subset`` column: rows and the mean of each proxy.

    Args:
        subsets: per sample, its subset (None where the corpus has none).
        nll: per sample, the student NLL (None without ``--student``).
        similarity: per sample, the largest benchmark similarity.
    """
    keys = np.array([-1 if value is None else int(value) for value in subsets])
    means = []
    for key in sorted(set(keys.tolist())):
        chosen = keys == key
        finite = chosen & np.isfinite(nll) if nll is not None else chosen
        means.append({"subset": None if key == -1 else key, "rows": int(chosen.sum()),
                      "nll_mean": float(nll[finite].mean()) if nll is not None and finite.any()
                      else None,
                      "max_similarity_mean": float(similarity[chosen].mean())})
    return means


def _device(name: str) -> torch.device:
    """``--device``: ``auto`` is CUDA when one is visible."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SelftrainError(f"--device {name}: not a device; use auto, cpu, cuda or "
                             "cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SelftrainError(f"--device {name}: no CUDA device is visible; use cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise SelftrainError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return device


def _benchmarks(specs: list[str], include_path: str | None, limit: int | None
                ) -> tuple[dict[str, list[list[str]]], dict[str, str]]:
    """Each benchmark's items by name, and the spec each name came from."""
    items: dict[str, list[list[str]]] = {}
    sources: dict[str, str] = {}
    for spec in specs:
        name, texts = load_benchmark(spec, include_path=include_path, limit=limit)
        if name in items:
            raise SelftrainError(f"--benchmarks {spec}: a second benchmark named {name!r}; "
                                 "rename one of the files")
        items[name], sources[name] = texts, spec
    return items, sources


def _measure(source: ChunkedCorpus, embedder, bench_vectors: dict[str, np.ndarray],
             scorer: StudentNll | None, batch_size: int
             ) -> tuple[dict[str, np.ndarray], dict[str, float | None]]:
    """One pass over the corpus: the per-sample columns of ``samples.parquet``, and timings."""
    parts: dict[str, list] = {"id": [], "subset": [], "nll": [], "kl": []}
    parts.update({f"max_similarity/{name}": [] for name in bench_vectors})
    seconds = {"embed": 0.0, "nll": 0.0}
    wanted = ["id", "subset", "text", "input_ids", "finished", "source_logprobs"]
    done = 0
    with tqdm(total=source.rows, unit="sample", desc="proxies", dynamic_ncols=True,
              disable=source.rows < _PROGRESS_FROM) as bar:
        for chunk in source.chunks(wanted, CHUNK_ROWS):
            count = len(chunk)
            parts["id"].append(chunk.columns.get("id") or list(range(done, done + count)))
            parts["subset"].append(chunk.columns.get("subset") or [None] * count)
            started = time.perf_counter()
            vectors = embed(embedder, [text if isinstance(text, str) else ""
                                       for text in chunk.columns["text"]], batch_size)
            for name, items in bench_vectors.items():
                parts[f"max_similarity/{name}"].append(max_similarity(vectors, items))
            seconds["embed"] += time.perf_counter() - started
            if scorer is not None:
                started = time.perf_counter()
                sums, counts, lengths = scorer.score(chunk)
                parts["nll"].append(sums / counts)
                parts["kl"].append(source_kl(chunk.columns.get("source_logprobs")
                                             or [None] * count, sums, counts, lengths,
                                             scorer.reuse, scorer.max_length))
                seconds["nll"] += time.perf_counter() - started
            done += count
            bar.update(count)
    columns: dict[str, Any] = {"id": np.array([v for p in parts["id"] for v in p], np.int64),
                               "subset": [v for p in parts["subset"] for v in p]}
    for name in bench_vectors:
        columns[f"max_similarity/{name}"] = np.concatenate(
            parts[f"max_similarity/{name}"]).astype(np.float64)
    columns["max_similarity"] = np.max([columns[f"max_similarity/{name}"]
                                        for name in bench_vectors], axis=0)
    if scorer is not None:
        columns["nll"] = np.concatenate(parts["nll"])
        columns["kl"] = np.concatenate(parts["kl"])
    timing = {"embed_seconds": round(seconds["embed"], 3),
              "nll_seconds": round(seconds["nll"], 3) if scorer else None,
              "samples_per_second_embed": round(done / max(seconds["embed"], 1e-9), 2),
              "samples_per_second_nll": (round(done / max(seconds["nll"], 1e-9), 2) if scorer
                                         else None)}
    return columns, timing


def stats(values: np.ndarray) -> dict[str, Any] | None:
    """Mean, population std, quantiles and a 20-bin histogram of the finite values (None if none).

    Args:
        values: the values.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    counts, edges = np.histogram(values, bins=20)
    return {"mean": float(values.mean()), "std": float(values.std()),
            "quantiles": {str(q): float(v) for q, v in zip(QUANTILES, np.quantile(
                values, QUANTILES), strict=True)},
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def _summary(source: ChunkedCorpus, columns: dict[str, Any], items: dict[str, list],
             specs: dict[str, str], threshold: float, embedding_model: str,
             student: str | None, timing: dict[str, float | None],
             precision: str | None = None) -> dict[str, Any]:
    """``summary.json`` (``split`` is filled in once it is written)."""
    manifest = source.manifest or {}
    origin, sampling = manifest.get("source"), manifest.get("sampling")
    per_benchmark = {}
    for name in items:
        values = columns[f"max_similarity/{name}"]
        per_benchmark[name] = {"source": specs[name], "items": len(items[name]),
                               "max_similarity": stats(values),
                               "fraction_above": float(np.mean(values >= threshold))}
    nll = stats(columns["nll"]) if student is not None else None
    if student is not None and nll is None:
        log.warning("proxies: no sample has 2 or more tokens for the student; no NLL")
    kl = stats(columns["kl"]) if student is not None else None
    kl_estimate = None
    if kl is not None:
        kl_estimate = {
            "estimates": "KL(q || student) per source token, q the source's sampling "
                         "distribution", "temperature": sampling.get("temperature")
            if isinstance(sampling, dict) else None,
            "top_k": sampling.get("top_k") if isinstance(sampling, dict) else None,
            "top_p": sampling.get("top_p") if isinstance(sampling, dict) else None,
            "samples": int(np.isfinite(columns["kl"]).sum())}
    return {
        "format": FORMAT, "corpus": str(source.path.resolve()),
        "corpus_kind": manifest.get("kind"),
        "source_model": origin.get("model") if isinstance(origin, dict) else None,
        "temperature": sampling.get("temperature") if isinstance(sampling, dict) else None,
        "rows": source.rows, "embedding_model": embedding_model, "threshold": threshold,
        "benchmarks": per_benchmark, "max_similarity": stats(columns["max_similarity"]),
        "fraction_above": float(np.mean(columns["max_similarity"] >= threshold)),
        "student": student, "student_precision": precision, "nll": nll, "kl": kl,
        "kl_estimate": kl_estimate, "split": None,
        "timing": timing,
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
