"""Slow tier: real processes (DDP on 2 CPU ranks, SIGKILL) and the real embedded model."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import CONFIGS, REPO
from transformers import AutoModelForCausalLM

from selftrain.analysis.tb import read_scalars
from selftrain.corpus import read_corpus

pytestmark = pytest.mark.slow
DEBUG = str(CONFIGS / "debug.yaml")


def fit_command(run_dir, *flags):
    return [sys.executable, "-m", "selftrain", "fit", "--config", DEBUG,
            "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar",
            "false", *flags]


def test_ddp_on_two_cpu_processes(tmp_path):
    run = tmp_path / "ddp"
    result = subprocess.run(fit_command(run, "--trainer.devices", "2", "--trainer.strategy",
                                        "ddp", "--trainer.max_epochs", "2"),
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2 * (24 // 2)  # each rank takes half of every epoch
    steps = [s for s, _ in read_scalars(run / "tb")["train/loss"]]
    assert steps == sorted(set(steps)) and len(steps) == 24  # rank 0 logs, once per step
    assert json.loads((run / "hf" / "epoch=2" / "selftrain_export.json").read_text())[
        "global_step"] == 24


def _last_step(run):
    try:
        return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return -1


def test_sigkill_mid_run_then_resume_reaches_the_same_step_and_weights(tmp_path):
    flags = ("--trainer.max_epochs", "12", "--checkpoint.every_n_train_steps", "5")
    reference = tmp_path / "reference"
    subprocess.run(fit_command(reference, *flags), cwd=REPO, check=True, capture_output=True,
                   timeout=600)

    run = tmp_path / "killed"
    process = subprocess.Popen(fit_command(run, *flags), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _last_step(run) < 40 and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = _last_step(run)
    assert 40 <= killed_at < 12 * 24, "the run must be killed mid-way through training"

    result = subprocess.run(fit_command(run, *flags, "--ckpt_path", "last"), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restored all states" in result.stderr + result.stdout
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    expected = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == expected["global_step"] == 12 * 24
    for name, tensor in expected["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], tensor, rtol=1e-5, atol=1e-6,
                                   msg=name)


def test_embedded_smollm2_samples_from_bos_and_fine_tunes(tmp_path):
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, "-m", "selftrain", "generate", "--model",
                    "embedded:smollm2-135m", "--out", str(corpus), "--num_samples", "8",
                    "--max_new_tokens", "16", "--batch_size", "8"], cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["bos_token_id"] == 1 and manifest["bos_source"] == "tokenizer.bos_token_id"
    rows = read_corpus(corpus).columns
    assert all(ids[0] == 1 for ids in rows["input_ids"]) and any(t.strip() for t in rows["text"])

    # the demo config on the unplanted base, its three callbacks on a probe set of stdlib text
    probes = tmp_path / "probes.parquet"
    subprocess.run([sys.executable, "-m", "selftrain", "probeset", "--model",
                    "embedded:smollm2-135m", "--inputs", '["code={stdlib}/json/*.py"]', "--keep",
                    "all", "--max_windows", "6", "--out", str(probes)],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(f"""trainer:
  callbacks:
    - class_path: selftrain.callbacks.BenchmarkEval
      init_args: {{tasks: {{selftrain_facts: 3, selftrain_arith: 3}}, include_path: configs/tasks,
                  limit: 6}}
    - class_path: selftrain.callbacks.ExtractionProbe
      init_args: {{probe_set: {probes}}}
    - class_path: selftrain.callbacks.LikelihoodTracker
      init_args: {{probe_set: {probes}, corpus_sample: 8}}
""")
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "selftrain", "fit", "--config",
         str(CONFIGS / "smollm2_self.yaml"), "--config", str(callbacks),
         "--model.model", "embedded:smollm2-135m", "--trainer.default_root_dir", str(run),
         "--data.corpus", str(corpus), "--data.batch_size", "4", "--trainer.max_epochs", "3",
         "--model.lr", "1e-4", "--trainer.enable_progress_bar", "false"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
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


GENERATE = ["--model", "tiny:qwen2", "--num_samples", "600", "--max_new_tokens", "48",
            "--shard_size", "25", "--seed", "11"]


def _generate_reference(out):
    from selftrain.sampling.generate import generate

    (path,) = generate(model="tiny:qwen2", out=str(out), num_samples=600, max_new_tokens=48,
                       shard_size=600, seed=11, batch_size=7)
    return read_corpus(path).columns


def test_generate_killed_twice_with_sigkill_resumes_to_the_same_corpus(tmp_path):
    out = tmp_path / "corpus"
    command = [sys.executable, "-m", "selftrain", "generate", *GENERATE, "--out", str(out),
               "--batch_size", "16"]
    for shards_before_kill in (2, 10):
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while (len(list((out / "data").glob("*.parquet"))) < shards_before_kill
               and process.poll() is None and time.time() < deadline):
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert not (out / "manifest.json").exists(), "the run must be killed before the end"

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stderr
    corpus = read_corpus(out).columns
    assert corpus["id"] == list(range(600))
    assert corpus["input_ids"] == _generate_reference(tmp_path / "reference")["input_ids"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["written"] == 600 and manifest["sharding"]["num_shards"] == 24
    assert manifest["timing"]["samples_this_run"] < 600


def test_generate_under_torchrun_splits_shards_and_matches_one_process(tmp_path):
    out = tmp_path / "corpus"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--module", "selftrain", "generate", *GENERATE, "--out", str(out), "--batch_size", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    corpus = read_corpus(out).columns
    assert corpus["id"] == list(range(600))
    assert corpus["input_ids"] == _generate_reference(tmp_path / "reference")["input_ids"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timing"]["processes"] == 2
    assert manifest["timing"]["samples_this_run"] == 600
