"""selftrain.trainer_cli: `selftrain fit` end to end on the debug config (SelftrainCLI).

What one fit writes (TensorBoard tags, the evaluation callbacks' cadence, the custom-scalars
layout, the HF export that lm-eval loads, the checkpoint), that the loss falls, the held-out loss
of `selftrain validate` against a direct computation; DDP on 2 CPU processes against one process
accumulating the same batches (slow). Resuming is tested in test_run_dir.py. The LightningCLI
internals SelftrainCLI overrides or relies on are checked to still be there.
"""

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    DEBUG,
    DEBUG_CORPUS,
    fit,
    fit_cli,
    one_error_line,
    run_fit,
    succeeded,
    write_jsonl,
    write_text_corpus,
)
from lightning.pytorch.cli import LightningCLI
from transformers import AutoModelForCausalLM, AutoTokenizer

from selftrain.analysis.tb import read_layout, read_scalars
from selftrain.models import load_model
from selftrain.trainer_cli import SelftrainCLI
from selftrain.training.batching import LengthGroupedBatchSampler


def test_the_lightning_cli_internals_it_overrides_are_still_there():
    """Checked against lightning 2.6.6: SelftrainCLI overrides ``_parse_ckpt_path`` and
    ``_set_seed`` (called from ``__init__``), calls ``_get``, and has its ``fit`` / ``validate``
    / ``test`` called by ``_run_subcommand`` in place of the Trainer's."""
    called = inspect.getsource(LightningCLI.__init__)
    for name in ("_parse_ckpt_path", "_set_seed"):
        assert list(inspect.signature(getattr(LightningCLI, name)).parameters) == ["self"], name
        assert f"self.{name}()" in called, name
    assert list(inspect.signature(LightningCLI._get).parameters)[:3] == ["self", "config", "key"]
    assert "getattr(self, subcommand" in inspect.getsource(LightningCLI._run_subcommand)
    for name in ("_parse_ckpt_path", "_set_seed", "fit", "validate", "test"):
        assert name in vars(SelftrainCLI), name


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


def test_a_non_finite_loss_stops_the_run_in_one_line_before_any_export(tmp_path):
    """lr 1e30 makes the weights non-finite after the first step: the next loss stops the run.

    Exit 2, one line naming the step, the last finite loss and what to do; the step is not
    taken, so no export (every epoch asked for) and no checkpoint holds non-finite weights.
    """
    run = tmp_path / "run"
    result = run_fit(run, "--model.lr", "1e30", "--trainer.max_epochs", "2",
                     "--model.export_hf", "every_epoch", "--checkpoint.every_n_train_steps", "1",
                     callbacks=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    line = one_error_line(result.stderr)
    assert re.search(r"--model.lr 1e\+30: the training loss is not finite \(nan\) at step "
                     r"(\d+); the last finite loss was [\d.]+ at step (\d+)\.", line), line
    assert not (run / "hf").exists() or not any((run / "hf").iterdir())
    for checkpoint in (run / "checkpoints").glob("*.ckpt"):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_loss_falls_on_learnable_text(tmp_path):
    corpus = write_text_corpus(tmp_path / "text.jsonl", rows=64)
    run = tmp_path / "run"
    fit(run, "--data.corpus", str(corpus), "--trainer.max_epochs", "4",
        "--model.export_hf", "never")
    epochs = [v for _, v in read_scalars(run / "tb")["train/loss_epoch"]]
    assert len(epochs) == 4
    assert epochs[-1] < 0.6 * epochs[0], epochs
    assert not (run / "hf").exists()


def debug_rows() -> list[list[int]]:
    """The debug corpus's token ids, read from its parquet shards with pyarrow alone."""
    shards = sorted((Path(DEBUG_CORPUS) / "data").glob("*.parquet"))
    return [row for shard in shards
            for row in pq.read_table(shard).column("input_ids").to_pylist()]


def test_validate_reports_the_token_weighted_nll_of_the_checkpoint(tmp_path):
    # a held-out corpus of token ids whose rows range from 2 to 49 tokens, so the mean NLL over
    # tokens, over rows and over batches all differ, and only the first is the documented one
    rows = [ids[:2 + (i * 7) % 60] for i, ids in enumerate(debug_rows()[:40])]
    heldout = write_jsonl(tmp_path / "heldout.jsonl", ({"input_ids": ids} for ids in rows))
    data = ["--data.eval_corpus", str(heldout), "--data.same_tokenizer", "true"]
    run = tmp_path / "run"
    fit(run, "--trainer.max_epochs", "1", *data, callbacks=False)
    during_fit = [v for _, v in read_scalars(run / "tb")["val/loss"]]
    checkpoint = run / "checkpoints" / "last.ckpt"
    # what `selftrain validate` runs (SelftrainCLI); its trainer keeps the reported metrics
    validated = SelftrainCLI(args=["validate", "--config", DEBUG, "--trainer.default_root_dir",
                                   str(run), "--trainer.enable_progress_bar", "false",
                                   *data, "--ckpt_path", str(checkpoint)])
    reported = validated.trainer.callback_metrics["val/loss"].item()

    # the same weights in a plain transformers model; each row alone (no padding), in float64
    model = AutoModelForCausalLM.from_pretrained(run / "hf" / "epoch=1").eval()
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    model.load_state_dict({name.removeprefix("model."): t for name, t in state.items()})
    total, targets, row_means = 0.0, 0, []
    with torch.no_grad():
        for ids in rows:
            ids = torch.tensor(ids)
            logits = model(ids[None]).logits[0, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
            total, targets = total + nll, targets + len(ids) - 1
            row_means.append(nll / (len(ids) - 1))
    expected = total / targets
    # float32 logits, padded batches and Lightning's float32 weighted mean against float64 sums
    # over unpadded rows: about 1e-7 apart (measured 2e-7); the row mean is 1.6e-3 away
    assert reported == pytest.approx(expected, rel=1e-5)
    assert abs(np.mean(row_means) - expected) > 100 * 1e-5 * expected  # the check can tell
    # the fit's own end-of-epoch validation saw the same weights
    assert during_fit == [pytest.approx(expected, rel=1e-5)]


# --- real processes -------------------------------------------------------------------------


DDP_EPOCHS = 2


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The debug config (no evaluation callbacks) for 2 epochs under DDP on 2 gloo processes.

    One thread per process (OMP_NUM_THREADS=1), so that the kernels' sums run in the same
    order as in the one-thread process it is compared with.
    """
    run = tmp_path_factory.mktemp("ddp") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        succeeded(run_fit(run, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                          "--trainer.max_epochs", str(DDP_EPOCHS), callbacks=False))
    return run


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(ddp_run):
    run = ddp_run
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2 * (24 // 2)  # each rank takes half of every epoch
    steps = [s for s, _ in read_scalars(run / "tb")["train/loss"]]
    assert steps == sorted(set(steps)) and len(steps) == 24  # rank 0 logs, once per step
    assert json.loads((run / "hf" / "epoch=2" / "selftrain_export.json").read_text())[
        "global_step"] == 24


@pytest.mark.slow
def test_ddp_equals_one_process_accumulating_the_same_batches(ddp_run, tmp_path):
    """DDP on 2 ranks gives the weights of 1 process with --trainer.accumulate_grad_batches 2.

    Which batches: every rank builds the same global plan of an epoch (seed, epoch) and rank r
    takes batches r, r+2, ...; one process (world size 1) builds that same plan and takes all
    of it, so with 2 batches accumulated per step its step k sees plan[2k] and plan[2k+1]:
    exactly rank 0's and rank 1's k-th batches (checked below on the plan itself).

    Why exactly equal: the loss is each batch's mean over its real tokens, and both ways
    weight the two batches of a step equally whatever their token counts: DDP averages the
    ranks' gradients, (g0 + g1) / 2; accumulation scales each batch's loss by 1/2 and sums,
    g0 / 2 + g1 / 2. Halving is exact in binary floating point and a sum of two is the same
    in either order, so with the same kernels (one thread each) the gradients, and so every
    Adam step, agree to the bit. (One process at batch 16 would not: its loss is the mean
    over the union's tokens, which weights the batch with more real tokens more.) The
    schedule agrees too: 12 optimizer steps per epoch either way.
    """
    lengths = [min(len(ids), 64) for ids in debug_rows()]  # the debug config's max_length
    for epoch in range(DDP_EPOCHS):
        one = LengthGroupedBatchSampler(lengths, batch_size=8).global_plan(epoch)
        ranks = []
        for rank in range(2):
            sampler = LengthGroupedBatchSampler(lengths, batch_size=8, rank=rank, world_size=2)
            sampler.set_epoch(epoch)
            ranks.append(list(sampler))
        assert len(one) == 24 and all(len(share) == 12 for share in ranks)
        for k in range(12):
            assert one[2 * k].tolist() == ranks[0][k] and one[2 * k + 1].tolist() == ranks[1][k]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        accumulated = fit_cli(tmp_path / "accumulated", "--trainer.accumulate_grad_batches", "2",
                              "--trainer.max_epochs", str(DDP_EPOCHS), callbacks=False,
                              export=False)
    finally:
        torch.set_num_threads(threads)
    assert accumulated.trainer.global_step == 24
    ddp = torch.load(ddp_run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    ours = accumulated.model.model.state_dict()
    assert sorted(f"model.{name}" for name in ours) == sorted(ddp)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, ddp[f"model.{name}"], rtol=0, atol=0, msg=name)
    base = load_model("tiny:qwen2").state_dict()
    assert all((ours[n] - base[n]).abs().max() > 1e-3 for n in base if "weight" in n)  # trained
