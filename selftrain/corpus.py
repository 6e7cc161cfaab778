"""The corpus directory: the one format every stage writes and reads.

A corpus dir holds ``manifest.json`` (provenance: source model, tokenizer, BOS id, sampling
parameters, seed, counts) and ``data/*.parquet`` shards with at least ``id``, ``text``,
``input_ids`` (source tokenizer, starting with the BOS id), ``num_tokens``, ``finished`` and
``subset``. It loads as it is with ``datasets.load_dataset("parquet", data_files=...)``.

Writers stage everything in a hidden sibling directory and swap it into place at the end, and
shards are written to a temp file and renamed (all through :mod:`selftrain.io`), so a killed run
never leaves a corpus that looks complete. Readers also accept plain ``.jsonl`` / ``.parquet`` /
``.txt`` files.

Every writer records where the ids come from the same way: :func:`provenance` (tokenizer, BOS
and EOS ids, the model and its resolved revision) and :func:`stamp` (format, tool version,
creation time).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from selftrain import __version__
from selftrain.errors import SelftrainError
from selftrain.io import (
    publish_dir,
    staging_dir,
    write_json_atomic,
    write_parquet_atomic,
)
from selftrain.outputs import check_out_dir

MANIFEST_NAME = "manifest.json"
PLAN_NAME = ".in_progress.json"
"""Present while a resumable writer (``selftrain generate``) is still filling the dir."""
DATA_DIR = "data"
FORMAT = "selftrain-corpus/1"

SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("text", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("num_tokens", pa.int32()),
    ("finished", pa.bool_()),
    ("subset", pa.int32()),
    ("source", pa.string()),
])


@dataclass
class Corpus:
    """Rows of a corpus in memory, plus its manifest when it came from a corpus dir.

    Args:
        path: where it was read from.
        columns: column name -> list of values (``text`` always; ``input_ids``, ``subset``,
            ``finished`` when present).
        manifest: the parsed ``manifest.json``, or None for plain files.
    """

    path: Path
    columns: dict[str, list[Any]]
    manifest: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.columns["text"]) if "text" in self.columns else len(
            self.columns["input_ids"])


@dataclass
class CorpusWriter:
    """Writes a corpus dir atomically: shards into a staging dir, then one swap into place.

    Args:
        out: the final corpus directory.
        shard_size: rows per parquet shard.
        overwrite: replace an existing corpus at ``out``.
    """

    out: Path
    shard_size: int = 10_000
    overwrite: bool = False
    _staging: Path | None = field(default=None, init=False, repr=False)
    _buffer: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)
    _shards: int = field(default=0, init=False, repr=False)
    rows_written: int = field(default=0, init=False)

    def __enter__(self) -> CorpusWriter:
        self.out = Path(self.out)
        check_corpus_out(self.out, self.overwrite)
        self._staging = staging_dir(self.out)
        (self._staging / DATA_DIR).mkdir()
        return self

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        """Buffer rows; full shards are flushed to disk as they fill."""
        self._buffer.extend(rows)
        while len(self._buffer) >= self.shard_size:
            self._flush(self._buffer[: self.shard_size])
            self._buffer = self._buffer[self.shard_size:]

    def _flush(self, rows: list[dict[str, Any]]) -> None:
        assert self._staging is not None
        table = pa.Table.from_pylist(
            [{name: row.get(name) for name in SCHEMA.names} for row in rows], schema=SCHEMA)
        final = self._staging / DATA_DIR / f"shard-{self._shards:05d}.parquet"
        write_parquet_atomic(table, final)
        self._shards += 1
        self.rows_written += len(rows)

    def finish(self, manifest: dict[str, Any]) -> Path:
        """Flush the last shard, write the manifest and swap the corpus into place.

        An existing corpus at ``out`` (allowed by ``overwrite``) is removed only once the new
        one is in place.
        """
        assert self._staging is not None
        if self._buffer:
            self._flush(self._buffer)
            self._buffer = []
        manifest = dict(manifest)
        manifest["counts"] = {**manifest.get("counts", {}), "written": self.rows_written}
        write_json_atomic(stamp(manifest), self._staging / MANIFEST_NAME)
        publish_dir(self._staging, self.out)
        self._staging = None
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def stamp(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest with the corpus format, the tool version and the creation time put first.

    Args:
        manifest: the writer's own fields.
    """
    return {"format": FORMAT, "tool_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **manifest}


def provenance(tokenizer, model: str, bos_token_id: int, bos_source: str,
               eos_token_id: int | None, source_config=None) -> dict[str, Any]:
    """The manifest fields that say where a corpus's ids come from.

    A corpus sampled from a model records that model as ``source``, with its resolved revision
    (hub commit, GGUF sha256 or tiny seed) and family; a corpus of real text tokenized for a
    student records the student's spec as ``student``. Both record the tokenizer (name, size,
    fingerprint), the BOS id with where it came from, and the EOS id.

    Args:
        tokenizer: the tokenizer the ``input_ids`` are in.
        model: the spec of the model that tokenizer belongs to.
        bos_token_id: the id every row starts with.
        bos_source: where ``bos_token_id`` came from (see ``models.resolve_bos_id``).
        eos_token_id: the id a finished row ends on (None when there is none).
        source_config: the loaded model's config when the model sampled the corpus; None when
            the text is real and ``model`` is the student it was tokenized for.

    Returns:
        ``source`` or ``student``, then ``tokenizer``, ``bos_token_id``, ``bos_source`` and
        ``eos_token_id``, in the order manifests list them.
    """
    # models pulls in torch and transformers, which readers of a corpus never need
    from selftrain.models import model_revision, tokenizer_fingerprint

    if source_config is not None:
        record: dict[str, Any] = {"source": {
            "model": model, "revision": model_revision(model, source_config),
            "family": source_config.model_type}}
    else:
        record = {"student": model}
    record["tokenizer"] = {"name": str(tokenizer.name_or_path), "vocab_size": len(tokenizer),
                           "fingerprint": tokenizer_fingerprint(tokenizer)}
    record.update(bos_token_id=bos_token_id, bos_source=bos_source, eos_token_id=eos_token_id)
    return record


CORPUS_MARKERS = (MANIFEST_NAME, PLAN_NAME)
"""Either marks a directory as a corpus this project wrote (finished, or being filled)."""
CORPUS_ENTRIES = (*CORPUS_MARKERS, DATA_DIR)
"""Every name a corpus dir holds, besides hidden temp files."""


def check_corpus_out(out: Path, overwrite: bool) -> bool:
    """:func:`selftrain.outputs.check_out_dir` for a corpus dir (see there)."""
    return check_out_dir(out, overwrite, CORPUS_MARKERS, CORPUS_ENTRIES, "corpus")


def read_corpus(path: str | Path, flag: str = "--data.corpus") -> Corpus:
    """Read a corpus dir, or a plain ``.parquet`` / ``.jsonl`` / ``.txt`` file.

    Plain text files give one document per non-empty line. jsonl and parquet rows need
    ``text`` or ``input_ids``.

    Args:
        path: the corpus dir or file.
        flag: the flag the path came from, named in error messages.

    Raises:
        SelftrainError: missing path, empty corpus, or rows without ``text`` / ``input_ids``.
    """
    path = Path(path)
    if not path.exists():
        raise SelftrainError(f"{flag} {path}: no such file or directory; run `selftrain "
                             "generate --out DIR` first or point it at a corpus")
    manifest = None
    if path.is_dir():
        manifest_path = path / MANIFEST_NAME
        shards = sorted((path / DATA_DIR).glob("*.parquet")) if (path / DATA_DIR).is_dir() else []
        if not manifest_path.exists() and not shards:
            shards = sorted(path.glob("*.parquet"))
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
        elif (path / PLAN_NAME).exists():
            raise SelftrainError(f"{flag} {path}: the corpus is unfinished; rerun the same "
                                 "`selftrain generate` command to complete it")
        if not shards:
            raise SelftrainError(f"{flag} {path}: no data/*.parquet shards; the corpus is "
                                 "empty or unfinished: regenerate it")
        table = pa.concat_tables([pq.read_table(shard) for shard in shards],
                                 promote_options="default")
        columns = table.to_pydict()
    elif path.suffix == ".parquet":
        columns = pq.read_table(path).to_pydict()
    elif path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        names = {name for row in rows for name in row}
        columns = {name: [row.get(name) for row in rows] for name in names}
    elif path.suffix in (".txt", ".text", ".md"):
        columns = {"text": [line for line in path.read_text().splitlines() if line.strip()]}
    else:
        raise SelftrainError(f"{flag} {path}: unsupported file type; use a corpus dir or a "
                             ".jsonl, .parquet or .txt file")
    if "text" not in columns and "input_ids" not in columns:
        raise SelftrainError(f"{flag} {path}: rows need a 'text' or 'input_ids' column")
    corpus = Corpus(path=path, columns=columns, manifest=manifest)
    if len(corpus) == 0:
        raise SelftrainError(f"{flag} {path}: the corpus is empty; regenerate it or point "
                             "at a non-empty corpus")
    return corpus
