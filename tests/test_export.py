"""selftrain.training.export: the student's HF export replaces an older one whole."""

import json

import torch
from safetensors.torch import load_file

from selftrain.models import load_model, load_tokenizer
from selftrain.training.export import save_hf


def test_hf_export_replaces_an_older_one_whole(tmp_path):
    model, tokenizer = load_model("tiny:qwen2"), load_tokenizer("tiny:qwen2")
    target = tmp_path / "hf" / "epoch=1"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("from an earlier run")
    save_hf(model, tokenizer, target, {"student": "tiny:qwen2", "epoch": 1, "global_step": 3})
    assert not (target / "stale.txt").exists()
    assert json.loads((target / "selftrain_export.json").read_text())["global_step"] == 3
    weights = load_file(target / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name in weights:
            assert torch.equal(weights[name], tensor), name
    assert [p.name for p in target.parent.iterdir()] == ["epoch=1"]  # no staging dir left
