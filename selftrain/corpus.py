"""The corpus directory: the one format every stage writes and reads.

A corpus dir holds ``manifest.json`` (provenance: source model, tokenizer, BOS id, sampling
parameters, seed, counts) and ``data/*.parquet`` shards with at least ``id``, ``text``,
``input_ids`` (source tokenizer, starting with the BOS id), ``num_tokens``, ``finished`` and
``subset``; ``selftrain generate`` adds ``source_logprobs``, each sampled token's
log-probability under the distribution it was drawn from (the relational proxy's source side;
null where a writer has none). It loads as it is with ``datasets.load_dataset("parquet",
data_files=...)``.

Writers stage everything in a hidden sibling directory and swap it into place at the end, and
shards are written to a temp file and renamed (all through :mod:`selftrain.io`), so a killed run
never leaves a corpus that looks complete. Readers also accept plain ``.jsonl`` / ``.parquet`` /
``.txt`` files.

Rows are read through :mod:`selftrain.inputs` (a damaged shard, a manifest that is not JSON,
a ``text`` that is not a string: one line naming the file). Every writer stamps its manifest
the same way, :func:`stamp` (format, tool version, creation time), beside the fields that say
where the ids come from (:mod:`selftrain.provenance`).
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

from selftrain import __version__
from selftrain.digests import ALGORITHM, check_files, digests_of
from selftrain.errors import SelftrainError
from selftrain.inputs import (
    check_rows,
    first_line,
    read_json_records,
    read_parquet,
    read_text,
    shown,
)
from selftrain.io import (
    missing_parents,
    publish_dir,
    remove_empty_dirs,
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
    ("source_logprobs", pa.list_(pa.float32())),
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
        for name in ("text", "input_ids", *self.columns):
            if name in self.columns:
                return len(self.columns[name])
        return 0


DAMAGED = "the corpus is damaged: regenerate it"
"""What a refusal of a corpus dir that lost or changed bytes tells the user to do."""


@dataclass
class CorpusWriter:
    """Writes a corpus dir atomically: shards into a staging dir, then one swap into place.

    Left without :meth:`finish` (an error, Ctrl-C), it removes the staging dir and the parent
    dirs it made, so a failed command leaves nothing behind.

    Args:
        out: the final corpus directory.
        shard_size: rows per parquet shard.
        overwrite: replace an existing corpus at ``out``.
    """

    out: Path
    shard_size: int = 10_000
    overwrite: bool = False
    _staging: Path | None = field(default=None, init=False, repr=False)
    _made: list[Path] = field(default_factory=list, init=False, repr=False)
    _buffer: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)
    _shards: int = field(default=0, init=False, repr=False)
    rows_written: int = field(default=0, init=False)

    def __enter__(self) -> CorpusWriter:
        self.out = Path(self.out)
        check_corpus_out(self.out, self.overwrite)
        self._made = missing_parents(self.out)
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
        manifest["counts"] = {**manifest.get("counts", {}), "written": self.rows_written,
                              "shards": self._shards}
        manifest["digests"] = shard_digests(self._staging)
        write_json_atomic(stamp(manifest), self._staging / MANIFEST_NAME)
        publish_dir(self._staging, self.out)
        self._staging = None
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
        """Abandoned before :meth:`finish`: remove the staging dir and the parents made for it."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
            remove_empty_dirs(self._made)


def stamp(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest with the corpus format, the tool version and the creation time put first.

    Args:
        manifest: the writer's own fields.
    """
    return {"format": FORMAT, "tool_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **manifest}


CORPUS_MARKERS = (MANIFEST_NAME, PLAN_NAME)
"""Either marks a directory as a corpus this project wrote (finished, or being filled)."""
CORPUS_ENTRIES = (*CORPUS_MARKERS, DATA_DIR)
"""Every name a corpus dir holds, besides hidden temp files."""


def check_corpus_out(out: Path, overwrite: bool) -> bool:
    """:func:`selftrain.outputs.check_out_dir` for a corpus dir (see there)."""
    return check_out_dir(out, overwrite, CORPUS_MARKERS, CORPUS_ENTRIES, "corpus")


def row_subsets(corpus: Corpus, num_subsets: int | None, path: str,
                flag: str = "--data.subset") -> list[Any]:
    """Each row's subset, as training assigns them.

    Args:
        corpus: the corpus.
        num_subsets: K; None, or the corpus's own K, uses its ``subset`` column; another K
            puts row i into subset i mod K.
        path: the corpus path, named in error messages.
        flag: the flag the subset came from (``num_subsets``' is named the same way).
    """
    column = corpus.columns.get("subset")
    stored_k = (corpus.manifest or {}).get("num_subsets")
    if num_subsets is None or (column is not None and num_subsets == stored_k):
        if column is None:
            raise SelftrainError(f"{flag}: {path} has no 'subset' column; also "
                                 f"set {flag.replace('subset', 'num_subsets')} K")
        return list(column)
    return [i % num_subsets for i in range(len(corpus))]


def select_subset(corpus: Corpus, subset: int | None, num_subsets: int | None,
                  path: str, flag: str = "--data.subset") -> list[int]:
    """Indices of the rows in subset ``subset`` (every row when None).

    Args:
        corpus: the training corpus.
        subset: ``--data.subset`` k.
        num_subsets: ``--data.num_subsets`` K; None, or the corpus's own K, uses its
            ``subset`` column; another K takes row i into subset i mod K.
        path: the corpus path, named in error messages.
        flag: the flag ``subset`` came from (``num_subsets``' is named the same way).
    """
    if subset is None:
        return list(range(len(corpus)))
    try:
        assigned = row_subsets(corpus, num_subsets, path, flag)
    except SelftrainError as error:
        raise SelftrainError(str(error).replace(f"{flag}:", f"{flag} {subset}:", 1)) from None
    keep = [i for i, k in enumerate(assigned) if k == subset]
    if not keep:
        raise SelftrainError(f"{flag} {subset}: no rows of {path} are in that subset; "
                             "pick a subset the corpus has")
    return keep


def corpus_documents(path: str | Path, flag: str, subset: int | None = None,
                     num_subsets: int | None = None, subset_flag: str = "--subset"
                     ) -> tuple[list[int], list[str]]:
    """The ids and non-empty texts of a corpus's documents (of one subset, if asked).

    A document is named by the corpus's ``id`` column, else by its row number.

    Args:
        path: a corpus dir or a .jsonl / .parquet / .txt file.
        flag: the flag it came from.
        subset: keep subset k only (:func:`select_subset`); None keeps every row.
        num_subsets: K, as :func:`select_subset` takes it.
        subset_flag: the flag ``subset`` came from.

    Raises:
        SelftrainError: no ``text`` column, ids that are not distinct integers.
    """
    corpus = read_corpus(path, flag=flag)
    if "text" not in corpus.columns:
        raise SelftrainError(f"{flag} {path}: has no 'text' column; give documents as text")
    rows = select_subset(corpus, subset, num_subsets, str(path), subset_flag)
    stored = corpus.columns.get("id")
    ids, texts = [], []
    for row in rows:
        text = corpus.columns["text"][row]
        if not (text and text.strip()):
            continue
        value = row if stored is None or stored[row] is None else stored[row]
        if isinstance(value, bool) or not isinstance(value, int):
            raise SelftrainError(f"{flag} {path}: row {row + 1} has id {shown(value)}, not an "
                                 "integer; give integer ids (or drop the column to use row "
                                 "numbers)")
        ids.append(value)
        texts.append(text)
    if len(set(ids)) != len(ids):
        raise SelftrainError(f"{flag} {path}: its 'id' column repeats ids; give each document "
                             "its own id (or drop the column to use row numbers)")
    return ids, texts


def read_corpus(path: str | Path, flag: str = "--data.corpus") -> Corpus:
    """Read a corpus dir, or a plain ``.parquet`` / ``.jsonl`` / ``.txt`` file.

    Plain text files give one document per non-empty line. jsonl and parquet rows need
    ``text`` or ``input_ids``; a ``text`` must be a string and ``input_ids`` a list of
    token ids (:func:`selftrain.inputs.check_rows`).

    Args:
        path: the corpus dir or file.
        flag: the flag the path came from, named in error messages.

    Raises:
        SelftrainError: missing path, a damaged shard, manifest or file, an empty corpus,
            rows without ``text`` / ``input_ids`` or with values of the wrong kind.
    """
    path = Path(path)
    if not path.exists():
        raise SelftrainError(f"{flag} {path}: no such file or directory; run `selftrain "
                             "generate --out DIR` first or point it at a corpus")
    manifest, schema = None, None
    if path.is_dir():
        columns, manifest, schema = _read_corpus_dir(path, flag)
    elif path.suffix == ".parquet":
        table = read_parquet(path, flag, "replace the file or point at another corpus")
        columns, schema = table.to_pydict(), table.schema
    elif path.suffix in (".jsonl", ".json"):
        rows = read_json_records(path, flag)
        names = {name: None for row in rows for name in row}
        columns = {name: [row.get(name) for row in rows] for name in names}
    elif path.suffix in (".txt", ".text", ".md"):
        columns = {"text": [line for line in read_text(path, flag).splitlines()
                            if line.strip()]}
    else:
        raise SelftrainError(f"{flag} {path}: unsupported file type; use a corpus dir or a "
                             ".jsonl, .parquet or .txt file")
    if not columns or not any(columns.values()):
        raise SelftrainError(f"{flag} {path}: the corpus is empty (no rows); regenerate it or "
                             "point at a non-empty corpus")
    if "text" not in columns and "input_ids" not in columns:
        raise SelftrainError(f"{flag} {path}: rows need a 'text' or 'input_ids' column")
    check_rows(columns, path, flag, schema)
    return Corpus(path=path, columns=columns, manifest=manifest)


def _read_corpus_dir(path: Path, flag: str
                     ) -> tuple[dict[str, list[Any]], dict[str, Any] | None, pa.Schema]:
    """A corpus dir's columns, its manifest (None without one) and its shards' schema."""
    manifest_path = path / MANIFEST_NAME
    shards = sorted((path / DATA_DIR).glob("*.parquet")) if (path / DATA_DIR).is_dir() else []
    if not manifest_path.exists() and not shards:
        shards = sorted(path.glob("*.parquet"))
    manifest = None
    if manifest_path.exists():
        manifest = read_manifest(manifest_path, flag)
    elif (path / PLAN_NAME).exists():
        raise SelftrainError(f"{flag} {path}: the corpus is unfinished; rerun the same "
                             "`selftrain generate` command to complete it")
    if not shards:
        raise SelftrainError(f"{flag} {path}: no data/*.parquet shards; the corpus is "
                             "empty or unfinished: regenerate it")
    check_shard_digests(path, manifest, flag)
    tables = [read_parquet(shard, flag, DAMAGED) for shard in shards]
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as error:
        raise SelftrainError(f"{flag} {path}: its shards disagree on their columns "
                             f"({first_line(error)}); {DAMAGED}") from None
    check_counts(path, manifest, table.num_rows, len(shards), flag)
    return table.to_pydict(), manifest, table.schema


def shard_digests(root: Path) -> dict[str, Any]:
    """The manifest's ``digests``: the xxh3-128 of every ``data/*.parquet`` shard of a corpus.

    Args:
        root: the corpus dir (or its staging dir), shards all written.
    """
    shards = sorted((root / DATA_DIR).glob("*.parquet"))
    return {"algorithm": ALGORITHM, "files": digests_of(root, shards)}


def check_shard_digests(path: Path, manifest: dict[str, Any] | None, flag: str) -> None:
    """Refuse a corpus dir whose shards differ from the digests its manifest records.

    A flipped byte in a parquet page can decode to other token ids without an error. Manifests
    written before digests (or by other tools) record none, and nothing is checked.

    Args:
        path: the corpus dir.
        manifest: its manifest (None: nothing to check against).
        flag: the flag the corpus came from.
    """
    digests = (manifest or {}).get("digests")
    if not isinstance(digests, dict) or digests.get("algorithm") != ALGORITHM:
        return
    if isinstance(digests.get("files"), dict):
        check_files(path, digests["files"], flag, MANIFEST_NAME,
                    f"{DAMAGED} (changed on purpose? remove `digests` from its manifest.json)")


def check_counts(path: Path, manifest: dict[str, Any] | None, rows: int, shards: int,
                 flag: str) -> None:
    """Refuse a corpus dir whose shards hold other rows or shards than its manifest records.

    A lost (or stray) shard would otherwise train without a word. Manifests record ``counts.
    written`` (rows) and ``counts.shards`` or ``sharding.num_shards``; what a manifest does not
    record is not checked.

    Args:
        path: the corpus dir.
        manifest: its manifest (None: nothing to check against).
        rows: rows its shards hold.
        shards: shards on disk.
        flag: the flag the corpus came from.
    """
    counts = (manifest or {}).get("counts") or {}
    sharding = (manifest or {}).get("sharding") or {}
    expected = {"rows": counts.get("written"),
                "shards": counts.get("shards", sharding.get("num_shards"))}
    found = {"rows": rows, "shards": shards}
    for what, value in expected.items():
        if isinstance(value, int) and not isinstance(value, bool) and value != found[what]:
            raise SelftrainError(f"{flag} {path}: its manifest records {expected['rows']} rows "
                                 f"in {expected['shards']} shard(s), but data/ holds {rows} "
                                 f"rows in {shards} shard(s): a shard is missing or does not "
                                 f"belong; {DAMAGED}")


def read_manifest(path: Path, flag: str) -> dict[str, Any]:
    """A corpus dir's manifest, refused in one line unless it is a JSON object."""
    try:
        manifest = json.loads(read_text(path, flag))
    except json.JSONDecodeError as error:
        raise SelftrainError(f"{flag} {path}: not valid JSON (line {error.lineno}: "
                             f"{error.msg}); {DAMAGED}") from None
    if not isinstance(manifest, dict):
        raise SelftrainError(f"{flag} {path}: not a JSON object; {DAMAGED}")
    return manifest
