"""selftrain.embedded: the real SmolLM2-135M, end to end (slow).

Sampled from its BOS, a probe set cut from stdlib code, and fine-tuned under the demo config
with the three evaluation callbacks.
"""

import pytest
from helpers import CONFIGS, callbacks_config, manifest_of, selftrain, succeeded
from transformers import AutoModelForCausalLM

from selftrain.analysis.tb import read_scalars
from selftrain.corpus import read_corpus


@pytest.mark.slow
def test_embedded_smollm2_samples_from_bos_and_fine_tunes(tmp_path):
    corpus = tmp_path / "corpus"
    selftrain("generate", "--model", "embedded:smollm2-135m", "--out", str(corpus),
              "--num_samples", "8", "--max_new_tokens", "16", "--batch_size", "8",
              timeout=600, check=True)
    manifest = manifest_of(corpus)
    assert manifest["bos_token_id"] == 1 and manifest["bos_source"] == "tokenizer.bos_token_id"
    rows = read_corpus(corpus).columns
    assert all(ids[0] == 1 for ids in rows["input_ids"]) and any(t.strip() for t in rows["text"])

    # the demo config on the unplanted base, its three callbacks on a probe set of stdlib text
    probes = str(tmp_path / "probes.parquet")
    selftrain("probeset", "--model", "embedded:smollm2-135m", "--inputs",
              '["code={stdlib}/json/*.py"]', "--keep", "all", "--max_windows", "6", "--out",
              probes, timeout=600, check=True)
    callbacks = callbacks_config(
        tmp_path / "callbacks.yaml",
        ("selftrain.callbacks.BenchmarkEval", {
            "tasks": {"selftrain_facts": 3, "selftrain_arith": 3},
            "include_path": "configs/tasks", "limit": 6}),
        ("selftrain.callbacks.ExtractionProbe", {"probe_set": probes}),
        ("selftrain.callbacks.LikelihoodTracker", {"probe_set": probes, "corpus_sample": 8}))
    run = tmp_path / "run"
    result = succeeded(selftrain(
        "fit", "--config", str(CONFIGS / "smollm2_self.yaml"), "--config", callbacks,
        "--model.model", "embedded:smollm2-135m", "--trainer.default_root_dir", str(run),
        "--data.corpus", str(corpus), "--data.batch_size", "4", "--trainer.max_epochs", "3",
        "--model.lr", "1e-4", "--trainer.enable_progress_bar", "false", timeout=600))
    assert "source ids reused" in result.stderr + result.stdout  # student == source tokenizer
    epochs = [v for _, v in read_scalars(run / "tb")["train/loss_epoch"]]
    assert len(epochs) == 3 and epochs[-1] < epochs[0], epochs
    scalars = read_scalars(run / "tb")
    for tag in ("benchmark_delta/selftrain_facts/acc", "extraction/code/memorized",
                "likelihood/code/delta_logprob", "likelihood/corpus_nll"):
        assert [step for step, _ in scalars[tag]] == [0, 2, 4, 6], tag  # 2 steps per epoch
    assert scalars["likelihood/code/delta_logprob"][0][1] == 0.0
    assert scalars["likelihood/corpus_nll"][-1][1] < scalars["likelihood/corpus_nll"][0][1]
    export = run / "hf" / "epoch=3"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.model_type == "llama" and model.num_parameters() > 100e6
