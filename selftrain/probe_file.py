"""The probe-set file: rows of held-out windows, and the metadata selftrain writes beside them.

A probe set is read by the probes (extraction, likelihood), by ``selftrain plant`` and by the
leak checks of curation and training (:mod:`selftrain.curation.leaks`), which sit below the
probes in the package's stages; so its reader lives in the core.
"""

from __future__ import annotations

import json
from pathlib import Path

from selftrain.errors import SelftrainError
from selftrain.inputs import read_json_records, read_parquet

METADATA_KEY = b"selftrain"
"""Parquet schema metadata key of a probe set written by selftrain (JSON: model, tokenizer...)."""


def read_probe_rows(path: str | Path, flag: str) -> tuple[dict[str, list], dict]:
    """Columns of a probe file (parquet or jsonl) and its selftrain metadata (or {}).

    Read through :mod:`selftrain.inputs`'s readers: a damaged parquet file or a line that is
    not a JSON object is refused in one line naming the file (and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise SelftrainError(f"{flag} {path}: no such file; build one with `selftrain "
                             "probeset` or `selftrain plant`, or give a parquet/jsonl file")
    if path.suffix == ".parquet":
        table = read_parquet(path, flag, "rebuild it with `selftrain probeset` or give another "
                                         "probe set")
        raw = (table.schema.metadata or {}).get(METADATA_KEY)
        return table.to_pydict(), json.loads(raw) if raw else {}
    if path.suffix in (".jsonl", ".json"):
        rows = read_json_records(path, flag)
        names = sorted({name for row in rows for name in row})
        return {name: [row.get(name) for row in rows] for name in names}, {}
    raise SelftrainError(f"{flag} {path}: unsupported file type; use .parquet or .jsonl")
