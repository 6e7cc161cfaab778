"""selftrain.probes.plant: `selftrain plant` trains canaries in until greedy decoding extracts them.

It writes the model and the probe set of the extracted canaries; a full ``--out`` is refused.
"""

import json

import torch
from helpers import selftrain

from selftrain.models import load_model, load_tokenizer
from selftrain.probes.plant import plant
from selftrain.probes.probeset import probeset
from selftrain.probes.windows import greedy_continuations, load_probe_set


def test_plant_makes_canaries_extractable_and_writes_model_and_probe_set(tmp_path,
                                                                         probe_sources):
    canaries = probeset("tiny:qwen2", probe_sources, str(tmp_path / "c.parquet"),
                        keep="all", prefix_tokens=8, suffix_tokens=8, max_windows=2)
    root = plant("tiny:qwen2", str(canaries), str(tmp_path / "planted"), prefix_tokens=8,
                 suffix_tokens=8, target=0.75, lr=3e-3, max_epochs=200, batch_size=4,
                 precision="32")
    record = json.loads((root / "plant.json").read_text())
    assert record["precision"] == "32"  # what ran, as resolved
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
    result = selftrain("plant", "--model", "tiny:qwen2", "--canaries",
                       str(tmp_path / "c.parquet"), "--out", str(tmp_path / "out"), timeout=600)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("selftrain: error: --out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
