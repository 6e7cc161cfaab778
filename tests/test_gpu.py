"""GPU tier: the CUDA paths of the scale options (skipped, with the reason, without a GPU).

Run on a GPU machine with ``pytest tests/test_gpu.py -rs``; the CPU suite covers the same logic
through gloo, this checks NCCL, bf16 on CUDA, fused AdamW, flash attention and bitsandbytes
(selftrain.training.fsdp, .checks, .optim), each by what it claims: the FSDP preset trains close
to the DDP preset, the optimizer is the one asked for (fused exactly when nothing forbids it),
flash attention is what the student runs and gives the SDPA loss, and every run's loss falls.
"""

import importlib.util

import lightning as L
import pytest
import torch
from helpers import (
    DDP_PRESET,
    FSDP_PRESET,
    evaluations,
    fit_cli,
    run_fit,
    succeeded,
    write_text_corpus,
)
from safetensors.torch import load_file

from selftrain.analysis.tb import read_scalars
from selftrain.models import load_model
from selftrain.training.optim import BNB_OPTIMIZERS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ONE_GPU_BF16 = ("--trainer.accelerator", "gpu", "--trainer.devices", "1",
                "--trainer.precision", "bf16-mixed")


def gpu_fit(run_dir, *flags):
    """The debug config for 2 epochs in a subprocess, checked: it must succeed."""
    return succeeded(run_fit(run_dir, "--trainer.max_epochs", "2", *flags, timeout=900))


def epoch_losses(run):
    """The run's ``train/loss_epoch``, one value per epoch."""
    return [v for _, v in read_scalars(run / "tb")["train/loss_epoch"]]


def assert_loss_falls(run, ratio=0.8):
    """The last epoch's loss is below ``ratio`` times the first's.

    On CPU in float32 the learnable text corpus falls below 0.6x in 4 epochs
    (``test_fit.test_loss_falls_on_learnable_text``); bf16 autocast and 8-bit optimizer
    states cost precision, not the learning signal, so 0.8 leaves room and still fails a run
    that does not learn.
    """
    losses = epoch_losses(run)
    assert losses[-1] < ratio * losses[0], losses


@pytest.fixture
def text_corpus(tmp_path):
    """The learnable text corpus (64 rows): its loss falls fast when training works."""
    return str(write_text_corpus(tmp_path / "text.jsonl", rows=64))


def learn(run, corpus, *flags, extra_callbacks=()):
    """4 epochs on the learnable corpus in this process, one GPU, bf16; the built CLI."""
    return fit_cli(run, *ONE_GPU_BF16, "--data.corpus", corpus, "--trainer.max_epochs", "4",
                   *flags, extra_callbacks=extra_callbacks, callbacks=False, export=False)


def test_fsdp_preset_trains_close_to_the_ddp_preset_on_gpus(tmp_path):
    devices = str(min(torch.cuda.device_count(), 2))
    runs = {"fsdp": tmp_path / "fsdp", "ddp": tmp_path / "ddp"}
    for name, preset in (("fsdp", FSDP_PRESET), ("ddp", DDP_PRESET)):
        gpu_fit(runs[name], "--config", preset, "--trainer.devices", devices,
                "--trainer.gradient_clip_val", "1.0")
    fsdp = runs["fsdp"]
    assert (fsdp / "checkpoints" / "last.ckpt").is_dir()
    for run in runs.values():
        for name in ("benchmark", "extraction", "likelihood"):
            assert evaluations(run, name) == [0, 24 // int(devices), 48 // int(devices)], name
        losses = epoch_losses(run)
        assert len(losses) == 2 and losses[1] < losses[0], losses
    # both bf16-mixed, but FSDP also gathers the weights and reduces the gradients in bf16
    # (2^-9 relative rounding each), where DDP keeps them in float32: close, not equal. The
    # gap must be small against how far training moved the weights from the base; a rank that
    # stepped on its own gradients alone (half the data) would be off by a large share of it.
    # (On CPU in float32 the two agree to 1e-5: tests/test_fsdp.py.)
    ours, theirs = (load_file(run / "hf" / "epoch=2" / "model.safetensors")
                    for run in (fsdp, runs["ddp"]))
    assert sorted(ours) == sorted(theirs)
    base = {k: v.float() for k, v in load_model("tiny:qwen2").state_dict().items()}
    gap = torch.cat([(ours[n].float() - theirs[n].float()).flatten() for n in ours]).norm()
    moved = torch.cat([(theirs[n].float() - base[n].cpu()).flatten() for n in theirs]).norm()
    assert moved > 0 and gap < 0.2 * moved, (gap, moved)
    for a, b in zip(epoch_losses(fsdp), epoch_losses(runs["ddp"]), strict=True):
        assert a == pytest.approx(b, rel=2e-2)  # bf16 losses: ~3 significant digits


class OptimizerAtStart(L.Callback):
    """Notes the optimizer as training starts (Lightning moves everything to CPU at the end)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        self.type = type(optimizer)
        self.fused = optimizer.defaults.get("fused")
        self.on_cuda = all(p.is_cuda for g in optimizer.param_groups for p in g["params"])


@pytest.mark.parametrize("clip, fused", [(None, True), ("1.0", False)],
                         ids=["fused", "clipped-unfused"])
def test_adamw_is_fused_on_gpu_unless_lightning_must_clip(tmp_path, text_corpus, clip, fused):
    # Lightning cannot clip (or unscale) for fused AdamW: with clipping the student must fall
    # back to the unfused one, without it take the fused kernel
    flags = ["--trainer.gradient_clip_val", clip] if clip else []
    seen = OptimizerAtStart()
    learn(tmp_path / "run", text_corpus, *flags, extra_callbacks=[seen])
    assert seen.type is torch.optim.AdamW and seen.on_cuda
    assert bool(seen.fused) is fused
    assert_loss_falls(tmp_path / "run")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None,
                    reason="needs flash-attn (pip install flash-attn)")
def test_attention_auto_picks_flash_on_ampere_in_bf16(tmp_path, text_corpus):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("flash attention needs an Ampere or newer GPU")
    flash = learn(tmp_path / "flash", text_corpus, "--data.packing", "true")
    assert flash.model.model.config._attn_implementation == "flash_attention_2"
    assert flash.datamodule.stats["packing"] is True  # no fallback to padding
    assert_loss_falls(tmp_path / "flash")
    sdpa = learn(tmp_path / "sdpa", text_corpus, "--model.attn_implementation", "sdpa")
    assert sdpa.model.model.config._attn_implementation == "sdpa"
    # same first batch, same initial weights: the packed flash loss is the padded SDPA loss,
    # up to bf16 rounding (~3 significant digits)
    first = [read_scalars(tmp_path / name / "tb")["train/loss"][0][1] for name in ("flash",
                                                                                   "sdpa")]
    assert first[0] == pytest.approx(first[1], rel=2e-2)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs bitsandbytes (pip install bitsandbytes)")
@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw"])
def test_bitsandbytes_optimizers_train_on_gpu(tmp_path, text_corpus, optimizer):
    built = learn(tmp_path / "run", text_corpus, "--model.optimizer", optimizer,
                  "--model.weight_decay", "0.1")
    used = built.trainer.optimizers[0]
    assert type(used).__module__.startswith("bitsandbytes")
    assert type(used).__name__ == BNB_OPTIMIZERS[optimizer]
    assert [group["weight_decay"] for group in used.param_groups] == [0.1, 0.0]
    assert_loss_falls(tmp_path / "run")
