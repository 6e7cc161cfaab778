"""A corpus read in chunks of rows, shard by shard, so a large corpus never sits in memory whole.

:func:`selftrain.corpus.read_corpus` reads every row at once, which suits training (the data
module holds the ids anyway) but not a pass that only needs a chunk at a time, as
`selftrain proxies` does over corpora of 100k samples and more. Here a corpus dir is opened from
its manifest and its shards' parquet metadata (row counts and columns, no data), and rows come
in chunks of the columns asked for, checked as :func:`selftrain.inputs.check_rows` checks them.
Plain ``.jsonl`` / ``.parquet`` / ``.txt`` files are small by nature and read whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from selftrain.corpus import (
    DAMAGED,
    DATA_DIR,
    MANIFEST_NAME,
    PLAN_NAME,
    Corpus,
    check_counts,
    check_shard_digests,
    read_corpus,
    read_manifest,
)
from selftrain.errors import SelftrainError
from selftrain.inputs import check_rows, readable_parquet


@dataclass
class ChunkedCorpus:
    """A corpus opened for reading in chunks.

    Args:
        path: the corpus dir or file.
        flag: the flag it came from, named in errors.
        manifest: its manifest (None for plain files).
        rows: the number of rows.
        columns: the column names the rows have.
        shards: its parquet shards (empty for a plain file, which is held in ``whole``).
        whole: the rows of a plain file.
    """

    path: Path
    flag: str
    manifest: dict[str, Any] | None
    rows: int
    columns: list[str]
    shards: list[Path] = field(default_factory=list)
    whole: Corpus | None = None

    def chunks(self, columns: list[str], size: int) -> Iterator[Corpus]:
        """The rows in order, ``size`` at a time, with those of ``columns`` the corpus has.

        Args:
            columns: the columns to read.
            size: rows per chunk (a shard's last chunk may be shorter).
        """
        if self.whole is not None:
            kept = {name: values for name, values in self.whole.columns.items()
                    if name in columns}
            for start in range(0, self.rows, size):
                yield Corpus(self.path, {name: values[start:start + size]
                                         for name, values in kept.items()}, self.manifest)
            return
        for shard in self.shards:
            with readable_parquet(shard, self.flag, DAMAGED):
                file = pq.ParquetFile(shard)
                schema = file.schema_arrow
                batches = file.iter_batches(batch_size=size, columns=[
                    name for name in columns if name in schema.names])
            while True:
                with readable_parquet(shard, self.flag, DAMAGED):
                    batch = next(batches, None)
                if batch is None:
                    break
                values = batch.to_pydict()
                check_rows(values, shard, self.flag, schema)
                yield Corpus(self.path, values, self.manifest)


def open_corpus(path: str | Path, flag: str = "--corpus") -> ChunkedCorpus:
    """Open a corpus dir (manifest and shard metadata only) or read a plain file.

    Args:
        path: a corpus dir, or a ``.jsonl`` / ``.parquet`` / ``.txt`` file.
        flag: the flag it came from, named in errors.

    Raises:
        SelftrainError: missing, unfinished, empty or damaged corpus.
    """
    path = Path(path)
    if not path.is_dir():
        whole = read_corpus(path, flag)  # refuses a missing path, an empty or damaged file
        return ChunkedCorpus(path, flag, None, len(whole), list(whole.columns), whole=whole)
    manifest_path = path / MANIFEST_NAME
    manifest = read_manifest(manifest_path, flag) if manifest_path.exists() else None
    if manifest is None and (path / PLAN_NAME).exists():
        raise SelftrainError(f"{flag} {path}: the corpus is unfinished; rerun the same "
                             "`selftrain generate` command to complete it")
    shards = sorted((path / DATA_DIR).glob("*.parquet")) if (path / DATA_DIR).is_dir() else []
    if manifest is None and not shards:
        shards = sorted(path.glob("*.parquet"))
    check_shard_digests(path, manifest, flag)  # before any shard is parsed
    rows, columns = 0, {}
    for shard in shards:
        with readable_parquet(shard, flag, DAMAGED):
            metadata = pq.ParquetFile(shard).metadata
        rows += metadata.num_rows
        columns.update(dict.fromkeys(metadata.schema.to_arrow_schema().names))
    check_counts(path, manifest, rows, len(shards), flag)
    if rows == 0:
        raise SelftrainError(f"{flag} {path}: the corpus is empty (no data/*.parquet rows); "
                             "regenerate it or point at a non-empty corpus")
    if "text" not in columns and "input_ids" not in columns:
        raise SelftrainError(f"{flag} {path}: rows need a 'text' or 'input_ids' column")
    return ChunkedCorpus(path, flag, manifest, rows, list(columns), shards=shards)
