"""selftrain.probes.probeset: `selftrain probeset` cuts distinct windows per domain."""

import json

import pyarrow.parquet as pq
import pytest
from helpers import CODE, LICENSE

from selftrain.errors import SelftrainError
from selftrain.models import load_tokenizer
from selftrain.probe_file import METADATA_KEY
from selftrain.probes.probeset import expand_input, probeset
from selftrain.probes.windows import load_probe_set


def test_probeset_cuts_distinct_windows_per_domain_and_records_extraction(tmp_path,
                                                                          probe_sources):
    out = probeset("tiny:qwen2", probe_sources, str(tmp_path / "c.parquet"), keep="all",
                   prefix_tokens=8, suffix_tokens=8, max_windows=5)
    table = pq.read_table(out)
    rows = table.to_pylist()
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    assert meta["prefix_tokens"] == 8 and meta["keep"] == "all"
    assert {r["domain"] for r in rows} == {"license", "code"}
    assert all(sum(r["domain"] == d for r in rows) == 5 for d in ("license", "code"))
    assert len({tuple(r["input_ids"][:8]) for r in rows}) == len(rows)  # distinct prefixes
    assert all(len(r["input_ids"]) == 16 and 0 <= r["matched_tokens"] <= 8 for r in rows)
    tokenizer = load_tokenizer("tiny:qwen2")
    for r in rows:  # each window is the text at its offset
        ids = tokenizer((LICENSE if r["domain"] == "license" else CODE),
                        add_special_tokens=False)["input_ids"]
        assert ids[r["offset"]:r["offset"] + 16] == r["input_ids"]
    # the callbacks read it back, reusing the ids (same tokenizer)
    probes = load_probe_set(out, tokenizer, 8, 8)
    assert probes.domains == ["code", "license"] and len(probes) == 10


def test_probeset_refuses_bad_inputs_with_one_line(tmp_path, probe_sources):
    with pytest.raises(SelftrainError, match="no file matches"):
        probeset("tiny:qwen2", ["code=/nonexistent/*.py"], str(tmp_path / "x.parquet"))
    with pytest.raises(SelftrainError, match=r"\.parquet"):
        probeset("tiny:qwen2", probe_sources, str(tmp_path / "x.jsonl"))
    for kwargs, message in (({"max_windows": 0}, "--max_windows 0: must be >= 1, or null"),
                            ({"seed": -1}, "--seed -1"),
                            ({"suffix_tokens": 0}, "--suffix_tokens 0: must be >= 1")):
        with pytest.raises(SelftrainError, match=message):
            probeset("tiny:qwen2", probe_sources, str(tmp_path / "x.parquet"), **kwargs)
    with pytest.raises(SelftrainError, match="extracts none"):  # a random model memorized nothing
        probeset("tiny:qwen2", probe_sources, str(tmp_path / "x.parquet"), prefix_tokens=8,
                 suffix_tokens=8)
    assert not (tmp_path / "x.parquet").exists()
    assert expand_input("code={stdlib}/json/__init__.py")[0][1].name == "__init__.py"
