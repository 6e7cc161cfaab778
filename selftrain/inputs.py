"""Every command's inputs, checked: what cannot be read or used is one line naming it.

:func:`read_text`, :func:`read_json_records` and :func:`read_parquet` turn bytes that are not
UTF-8, a line that is not JSON or a damaged parquet file into one line naming the file (and the
line) and what to do; :func:`check_rows` refuses a ``text`` that is not a string or
``input_ids`` that are not token ids, wherever rows come from (corpora, probe sets, probe-set
inputs); :func:`check_seed` holds every command's seed to what is recorded. Nothing here knows
a file format of this project: the corpus dir (:mod:`selftrain.corpus`) and the probe-set file
(:mod:`selftrain.probe_file`) read through these.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from selftrain.errors import SelftrainError


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def read_text(path: Path, flag: str) -> str:
    """A file's text (UTF-8), refused in one line naming the file when it cannot be read.

    Args:
        path: the file.
        flag: the flag it came from, named in the error.
    """
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SelftrainError(f"{flag} {path}: not UTF-8 text (a bad byte at offset "
                             f"{error.start}); give a text file") from None
    except OSError as error:
        raise SelftrainError(f"{flag} {path}: cannot read it ({error.strerror or error}); "
                             "fix the path or its permissions") from None


@contextmanager
def readable_parquet(path: Path, flag: str, fix: str) -> Iterator[None]:
    """Turn pyarrow's failure to read a parquet file (garbage, cut short) into one line.

    Every parquet reader of the project reads inside this block (:func:`read_parquet`), so a
    damaged file is named the same way wherever it is read.

    Args:
        path: the parquet file read in the block.
        flag: the flag it came from.
        fix: what to do, e.g. "the corpus is damaged: regenerate it".
    """
    try:
        yield
    except (OSError, pa.ArrowException) as error:  # ArrowInvalid is a ValueError too
        reason = first_line(error)
        if reason.startswith("Could not open") and "': " in reason:  # it repeats the path
            reason = reason.split("': ", 1)[1]
        reason = reason.split(". ")[0].rstrip(".")  # pyarrow adds sentences of guesses
        raise SelftrainError(f"{flag} {path}: not a readable parquet file ({reason}); "
                             f"{fix}") from None


def read_parquet(path: Path, flag: str, fix: str, columns: list[str] | None = None
                 ) -> pa.Table:
    """A parquet file as a table, refused in one line when it cannot be read.

    Args:
        path: the parquet file.
        flag: the flag it came from.
        fix: what to do about a damaged file.
        columns: the columns to read (None: all).
    """
    with readable_parquet(path, flag, fix):
        return pq.read_table(path, columns=columns)


def read_json_records(path: Path, flag: str, objects: bool = True) -> list[Any]:
    """The records of a JSON-lines file, or of a ``.json`` file holding one JSON document.

    A ``.json`` file that parses whole gives its list's items (or itself, when it is not a
    list); otherwise (and always for ``.jsonl``) each non-blank line is one record.

    Args:
        path: the file.
        flag: the flag it came from, named in errors with the line at fault.
        objects: each record must be a JSON object (a row with named fields).

    Raises:
        SelftrainError: the file cannot be read, a line is not JSON, or (``objects``) a
            record is not an object.
    """
    text = read_text(path, flag)
    if path.suffix.lower() == ".json" and text.lstrip()[:1] in ("[", "{"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            pass  # JSON lines in a .json file: read below, line by line
        else:
            records = document if isinstance(document, list) else [document]
            for number, record in enumerate(records, start=1):
                if objects and not isinstance(record, dict):
                    raise SelftrainError(f"{flag} {path}: record {number} is not a JSON "
                                         "object; write a list of objects")
            return records
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SelftrainError(f"{flag} {path}: line {number} is not valid JSON "
                                 f"({error.msg}); fix or remove that line") from None
        if objects and not isinstance(record, dict):
            raise SelftrainError(f"{flag} {path}: line {number} is not a JSON object; write "
                                 "one object per line")
        records.append(record)
    return records


def is_token_ids(value: Any) -> bool:
    """Whether a value is a list of token ids (integers >= 0; a bool is no token id)."""
    return isinstance(value, list) and all(
        type(token) is int and token >= 0 for token in value)


def check_rows(columns: dict[str, list[Any]], path: Path, flag: str,
               schema: pa.Schema | None = None) -> None:
    """Refuse a ``text`` that is not a string and ``input_ids`` that are not token ids.

    A missing value (None) passes: what needs it refuses it where it is needed.

    Args:
        columns: column name -> values.
        path: the file or dir they came from, named in the error with the row.
        flag: the flag it came from.
        schema: the parquet schema they were read with; a column it types as strings, or
            as lists of integers, is not checked value by value (only for negative ids).
    """
    texts = columns.get("text")
    if texts is not None and not (schema is not None and "text" in schema.names
                                  and _is_strings(schema.field("text").type)):
        for row, text in enumerate(texts, start=1):
            if text is not None and not isinstance(text, str):
                raise SelftrainError(f"{flag} {path}: row {row} has text {shown(text)}, not "
                                     "a string; fix that row")
    ids = columns.get("input_ids")
    if ids is None:
        return
    typed = schema is not None and "input_ids" in schema.names and _is_integer_lists(
        schema.field("input_ids").type)
    for row, value in enumerate(ids, start=1):
        if value is not None and not (min(value, default=0) >= 0 if typed
                                      else is_token_ids(value)):
            raise SelftrainError(f"{flag} {path}: row {row} has input_ids {shown(value)}, "
                                 "not a list of token ids (integers >= 0); fix that row, or "
                                 "drop the input_ids to tokenize the text")


def shown(value: Any) -> str:
    """A value as JSON, cut to 40 characters, for an error message."""
    shown = json.dumps(value, default=str)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _is_strings(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_integer_lists(kind: pa.DataType) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(
        kind.value_type)


SEED_MAX = 2**63 - 1
"""The largest seed any command takes: seeds are recorded (manifests, probe-set metadata,
checkpoints) and read back as signed 64-bit integers."""


def check_seed(seed: int, flag: str = "--seed", maximum: int = SEED_MAX) -> None:
    """Refuse a seed outside ``0..maximum`` instead of letting a consumer wrap or reject it.

    Args:
        seed: the seed given.
        flag: the flag it came from.
        maximum: the largest seed the consumer takes (:data:`SEED_MAX` unless it takes fewer).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= maximum:
        raise SelftrainError(f"{flag} {seed}: a seed is an integer in 0..{maximum}; pick one "
                             "in that range")
