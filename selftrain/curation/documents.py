"""Real documents for the replay baseline: local text files and streamed `datasets` names.

``selftrain replay`` fills its rows with the starts of real documents. They come from local
.txt files (one document per blank-line-separated paragraph), .jsonl / .json records and .parquet
columns (the ``--text_field``), directories of those, or a `datasets` name streamed from the hub.
Local documents are pooled and shuffled with the seed; each dataset follows, in the given
order, through a seeded shuffle buffer. Every document comes with its source (a file path or
the dataset name), which replay writes into its rows. Documents are tokenized for the student
only as far as the longest row needs (:func:`encoded`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from selftrain.errors import SelftrainError
from selftrain.inputs import (
    first_line,
    read_json_records,
    read_parquet,
    read_text,
    readable_parquet,
)

TEXT_SUFFIXES = (".txt", ".text", ".md")
LOCAL_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet")
ENCODE_BATCH = 256
CHARS_PER_TOKEN = 16
"""A document is first tokenized only up to this many characters per token of the longest
window; book-length documents (common in Common Corpus) are never tokenized whole."""
PARQUET_FIX = "replace the file or leave it out of --sources"
"""What to do about a damaged parquet source."""
CUT_MARGIN = 16
"""Tokens before a character cut that are not trusted (the tokenizer may merge there)."""


def is_local(source: str) -> bool:
    """A path (existing, or shaped like one) rather than a `datasets` name."""
    return (Path(source).exists() or Path(source).suffix in LOCAL_SUFFIXES
            or source.startswith((".", "/", "~")))


def local_files(source: str) -> list[Path]:
    """The files of a local source: the file itself, or a dir's files (hidden ones skipped).

    Args:
        source: a ``--sources`` entry that :func:`is_local` accepts.

    Raises:
        SelftrainError: a missing path, an unsupported file type or a dir without text files.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise SelftrainError(f"--sources {source}: no such file or directory")
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise SelftrainError(f"--sources {source}: unsupported file type; use "
                                 f"{', '.join(LOCAL_SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise SelftrainError(f"--sources {source}: the directory holds no "
                             f"{'/'.join(LOCAL_SUFFIXES)} files")
    return files


def documents(local: list[str], names: list[str], text_field: str, split: str, seed: int,
              shuffle_buffer: int) -> Iterator[tuple[str, str]]:
    """(text, source) pairs: local documents pooled and shuffled, then each dataset streamed.

    Args:
        local: local sources (files or dirs), checked by :func:`local_files`.
        names: `datasets` names, streamed in this order after the local documents.
        text_field: the field / column holding the text in jsonl, parquet and datasets.
        split: the split of a dataset.
        seed: orders the local documents and seeds each dataset's shuffle buffer.
        shuffle_buffer: documents held in a dataset's shuffle buffer.
    """
    if local:
        docs = [doc for source in local for path in local_files(source)
                for doc in _read_file(path, text_field)]
        for index in np.random.default_rng([seed, 1]).permutation(len(docs)):
            yield docs[index]
    for name in names:
        yield from _stream(name, split, text_field, seed, shuffle_buffer)


def _read_file(path: Path, text_field: str) -> list[tuple[str, str]]:
    """The non-empty documents of one local file, each with the file's path as its source.

    Files are read through :mod:`selftrain.inputs`'s readers, so a damaged parquet file, a
    line that is not JSON or bytes that are not UTF-8 are refused in one line naming the file.
    """
    flag = "--sources"
    if path.suffix in TEXT_SUFFIXES:
        texts = [p.strip() for p in re.split(r"\n\s*\n", read_text(path, flag))]
    elif path.suffix == ".parquet":
        with readable_parquet(path, flag, PARQUET_FIX):
            names = pq.read_schema(path).names
        if text_field not in names:
            raise SelftrainError(f"--text_field {text_field}: {path} has no such column; it has "
                                 f"{', '.join(names)}")
        texts = read_parquet(path, flag, PARQUET_FIX, columns=[text_field]).column(0).to_pylist()
    else:
        records = read_json_records(path, flag, objects=False)
        if records and not any(isinstance(r, dict) and text_field in r for r in records):
            fields = sorted({k for r in records if isinstance(r, dict) for k in r})
            raise SelftrainError(f"--text_field {text_field}: no record of {path} has that "
                                 f"field; it has {', '.join(fields) or 'none'}")
        texts = [r.get(text_field) for r in records if isinstance(r, dict)]
    return [(text, str(path)) for text in texts if isinstance(text, str) and text.strip()]


def _stream(name: str, split: str, text_field: str, seed: int,
            shuffle_buffer: int) -> Iterator[tuple[str, str]]:
    """Documents of a `datasets` name, streamed through a seeded shuffle buffer."""
    import datasets

    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
        for row in stream.shuffle(seed=seed, buffer_size=shuffle_buffer):
            if text_field not in row:
                raise SelftrainError(f"--text_field {text_field}: dataset {name} has no such "
                                     f"column; it has {', '.join(row)}")
            text = row[text_field]
            if isinstance(text, str) and text.strip():
                yield text, name
    except SelftrainError:
        raise
    except Exception as error:  # the hub, the cache and the split all fail in their own types
        raise SelftrainError(f"--sources {name}: cannot stream split {split!r} of this dataset "
                             f"({first_line(error)}); unreachable offline: pass local .txt/.jsonl/"
                             ".parquet files or a dir instead") from None


def encoded(texts: Iterable[tuple[str, str]], tokenizer, eos_id: int | None,
             longest: int) -> Iterator[tuple[list[int], bool, str]]:
    """(ids, whole document, source): ids + EOS for a whole document, else a long prefix.

    A prefix is only returned when it is longer than ``longest`` (the longest window), so a
    cut document can fill any row but never counts as finished.

    Args:
        texts: (text, source) documents, as :func:`documents` yields them.
        tokenizer: the student's tokenizer.
        eos_id: appended to a whole document's ids (None: nothing appended).
        longest: the longest window a document may have to fill.
    """
    budget = CHARS_PER_TOKEN * (longest + CUT_MARGIN)
    texts = iter(texts)
    while batch := list(islice(texts, ENCODE_BATCH)):
        prefixes = [text[:budget] for text, _ in batch]
        encoded = tokenizer(prefixes, add_special_tokens=False, verbose=False)["input_ids"]
        for (text, source), ids in zip(batch, encoded, strict=True):
            if len(text) > budget:
                if len(ids) > longest + CUT_MARGIN:
                    yield ids[: longest + 1], False, source
                    continue
                ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            yield ([*ids, eos_id] if eos_id is not None else ids), True, source
