"""selftrain.trainer_cli: `selftrain fit` end to end on the debug config (SelftrainCLI).

What one fit writes (TensorBoard tags, the evaluation callbacks' cadence, the custom-scalars
layout, the HF export that lm-eval loads, the checkpoint), that the loss falls, validation, and
resuming: from a mid-epoch checkpoint, and (slow) after a SIGKILL; DDP on 2 CPU processes (slow).
"""

import json
import re

import pytest
import torch
from helpers import (
    DEBUG,
    cli,
    fit,
    fit_cli,
    fit_command,
    kill_when,
    run_fit,
    succeeded,
    write_text_corpus,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from selftrain.analysis.tb import read_layout, read_scalars
from selftrain.cli import main


def test_debug_config_trains_logs_and_exports(run_dir):
    fit(run_dir)
    scalars = read_scalars(run_dir / "tb")
    for tag in ("train/loss", "train/lr", "train/tokens_per_sec", "train/real_token_fraction"):
        assert tag in scalars, sorted(scalars)
    steps = [step for step, _ in scalars["train/loss"]]
    assert steps[-1] == 3 * 24 - 1 and len(steps) == 72  # 3 epochs x 24 batches
    lrs = [v for _, v in scalars["train/lr"]]
    assert max(lrs) == pytest.approx(3e-3, rel=1e-3) and lrs[-1] < 0.2 * max(lrs)  # warm + decay
    fractions = [v for _, v in scalars["train/real_token_fraction"]]
    assert sum(fractions) / len(fractions) > 0.95
    assert all(v > 0 for _, v in scalars["train/tokens_per_sec"])

    export = run_dir / "hf" / "epoch=3"
    assert json.loads((export / "selftrain_export.json").read_text())["global_step"] == 72
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.decode(tokenizer("same bytes")["input_ids"]) == "same bytes"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 72
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, checkpoint["state_dict"][f"model.{name}"]), name
    assert (run_dir / "tb" / "config.yaml").exists()

    # the three evaluation callbacks of the debug config: base at step 0, then every epoch
    families = {"benchmark_delta/": 2, "extraction/": 6, "likelihood/": 7}  # + all-domain tags
    for prefix, count in families.items():
        tags = [tag for tag in scalars if tag.startswith(prefix)]
        assert len(tags) == count, (prefix, tags)
        for tag in tags:
            assert [step for step, _ in scalars[tag]] == [0, 24, 48, 72], tag
        for tag in (t for t in tags if "delta" in t):
            assert scalars[tag][0][1] == 0.0, tag
    # one custom-scalars page whose charts pick up exactly those families
    layout = read_layout(run_dir / "tb")
    for title, prefix in (("benchmark delta vs base", "benchmark_delta/"),
                          ("extraction: memorized rows", "extraction/"),
                          ("likelihood delta vs base", "likelihood/")):
        matched = {tag for tag in scalars
                   if any(re.fullmatch(pattern, tag) for pattern in layout[title])}
        assert matched and all(tag.startswith(prefix) for tag in matched), (title, matched)
    assert {t.split("/")[1] for t in scalars if re.fullmatch(r"extraction/[^/]+/memorized", t)
            } == {"code", "license"}

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(export), device="cpu", batch_size=2)  # lm-eval's `--model hf`
    request = Instance(request_type="loglikelihood", doc={}, arguments=("the cat", " sat"), idx=0)
    [(logprob, _)] = lm.loglikelihood([request])
    assert logprob < 0


def test_loss_falls_on_learnable_text(tmp_path):
    corpus = write_text_corpus(tmp_path / "text.jsonl", rows=64)
    run = tmp_path / "run"
    fit(run, "--data.corpus", str(corpus), "--trainer.max_epochs", "4",
        "--model.export_hf", "never")
    epochs = [v for _, v in read_scalars(run / "tb")["train/loss_epoch"]]
    assert len(epochs) == 4
    assert epochs[-1] < 0.6 * epochs[0], epochs
    assert not (run / "hf").exists()


def test_eval_corpus_gives_val_loss_and_validate_runs(tmp_path, qwen_corpus):
    run = tmp_path / "run"
    fit(run, "--trainer.max_epochs", "1", "--data.eval_corpus", str(qwen_corpus))
    assert "val/loss" in read_scalars(run / "tb")
    main(["validate", "--config", DEBUG, "--trainer.default_root_dir", str(run),
          "--data.eval_corpus", str(qwen_corpus), "--ckpt_path", str(run / "checkpoints" /
                                                                        "last.ckpt")])


EVERY_10_STEPS = ("--checkpoint.every_n_train_steps", "10")


def test_mid_epoch_checkpoint_resumes_to_the_same_step_and_weights(tmp_path):
    from lightning.pytorch import Callback

    class Crash(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 15:
                raise RuntimeError("simulated crash")

    reference = fit_cli(tmp_path / "ref", *EVERY_10_STEPS, "--trainer.max_epochs", "2")

    crashed = cli(tmp_path / "run", *EVERY_10_STEPS, "--trainer.max_epochs", "2")
    crashed.trainer.callbacks.append(Crash())
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.trainer.fit(crashed.model, crashed.datamodule)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 10  # mid-epoch: 10 of 24 batches
    assert state["CorpusDataModule"] == {"epoch": 0, "batches_done": 10}

    resumed = fit_cli(tmp_path / "run", *EVERY_10_STEPS, "--trainer.max_epochs", "2",
                      ckpt_path="last")
    assert resumed.trainer.global_step == reference.trainer.global_step == 48
    for (name, a), b in zip(reference.model.model.state_dict().items(),
                            resumed.model.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# --- real processes -------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    run = tmp_path / "ddp"
    succeeded(run_fit(run, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      "--trainer.max_epochs", "2"))
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


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_reaches_the_same_step_and_weights(tmp_path):
    flags = ("--trainer.max_epochs", "12", "--checkpoint.every_n_train_steps", "5")
    reference = tmp_path / "reference"
    succeeded(run_fit(reference, *flags))

    run = tmp_path / "killed"
    kill_when(fit_command(run, *flags), lambda: _last_step(run) >= 40, poll=0.05)
    killed_at = _last_step(run)
    assert 40 <= killed_at < 12 * 24, "the run must be killed mid-way through training"

    result = succeeded(run_fit(run, *flags, "--ckpt_path", "last"))
    assert "Restored all states" in result.stderr + result.stdout
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    expected = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == expected["global_step"] == 12 * 24
    for name, tensor in expected["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], tensor, rtol=1e-5, atol=1e-6,
                                   msg=name)
