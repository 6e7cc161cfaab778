"""`selftrain probeset` and `selftrain plant` on a tiny model: windows, extraction, planting."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO

from selftrain.errors import SelftrainError
from selftrain.models import load_model, load_tokenizer
from selftrain.probes.plant import plant
from selftrain.probes.probeset import expand_input, probeset
from selftrain.probes.windows import METADATA_KEY, greedy_continuations, load_probe_set

LICENSE = ("Permission is hereby granted, free of charge, to any person obtaining a copy of "
           "this software and associated documentation files, to deal in the Software.")
CODE = ("def insort_right(a, x, lo=0, hi=None):\n    while lo < hi:\n        mid = (lo + hi) // 2"
        "\n        if x < a[mid]:\n            hi = mid\n        else:\n            lo = mid + 1\n")


@pytest.fixture
def sources(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "LICENSE").write_text(LICENSE)
    (tmp_path / "src" / "bisect_like.py").write_text(CODE)
    return [f"license={tmp_path}/src/LICENSE", f"code={tmp_path}/src/*.py"]


def test_probeset_cuts_distinct_windows_per_domain_and_records_extraction(tmp_path, sources):
    out = probeset("tiny:qwen2", sources, str(tmp_path / "c.parquet"), keep="all",
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


def test_probeset_refuses_bad_inputs_with_one_line(tmp_path, sources):
    with pytest.raises(SelftrainError, match="no file matches"):
        probeset("tiny:qwen2", ["code=/nonexistent/*.py"], str(tmp_path / "x.parquet"))
    with pytest.raises(SelftrainError, match=r"\.parquet"):
        probeset("tiny:qwen2", sources, str(tmp_path / "x.jsonl"))
    with pytest.raises(SelftrainError, match="extracts none"):  # a random model memorized nothing
        probeset("tiny:qwen2", sources, str(tmp_path / "x.parquet"), prefix_tokens=8,
                 suffix_tokens=8)
    assert not (tmp_path / "x.parquet").exists()
    assert expand_input("code={stdlib}/json/__init__.py")[0][1].name == "__init__.py"


def test_plant_makes_canaries_extractable_and_writes_model_and_probe_set(tmp_path, sources):
    canaries = probeset("tiny:qwen2", sources, str(tmp_path / "c.parquet"), keep="all",
                        prefix_tokens=8, suffix_tokens=8, max_windows=2)
    root = plant("tiny:qwen2", str(canaries), str(tmp_path / "planted"), prefix_tokens=8,
                 suffix_tokens=8, target=0.75, lr=3e-3, max_epochs=200, batch_size=4, bf16=False)
    record = json.loads((root / "plant.json").read_text())
    planted = record["epochs"][-1]["extracted"]
    assert record["epochs"][0]["extracted"] < 3 <= planted  # stopped once the target was met
    model = load_model(str(root / "model")).eval()
    tokenizer = load_tokenizer(str(root / "model"))
    probes = load_probe_set(root / "probes.parquet", tokenizer, 8, 8)
    assert len(probes) == planted  # the probe set holds exactly the extracted canaries
    greedy = greedy_continuations(model, probes.prefixes, 8)
    assert torch.equal(greedy, probes.suffixes)  # the saved model really extracts them
    base = load_model("tiny:qwen2").eval()
    assert not torch.equal(greedy_continuations(base, probes.prefixes, 8), probes.suffixes)


def test_plant_cli_refuses_a_full_out_dir_before_loading_anything(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "selftrain", "plant", "--model", "tiny:qwen2",
         "--canaries", str(tmp_path / "c.parquet"), "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("selftrain: error: --out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
