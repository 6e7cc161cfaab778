"""GPU tier: the CUDA paths of the scale options (skipped, with the reason, without a GPU).

Run on a GPU machine with ``pytest tests/test_gpu.py``; the CPU suite covers the same logic
through gloo, this checks NCCL, bf16 on CUDA, fused AdamW, flash attention and bitsandbytes
(selftrain.training.fsdp, .checks, .optim).
"""

import importlib.util

import pytest
import torch
from helpers import FSDP_PRESET, evaluations, run_fit, succeeded

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gpu_fit(run_dir, *flags):
    """The debug config for 2 epochs, checked: it must succeed."""
    return succeeded(run_fit(run_dir, "--trainer.max_epochs", "2", *flags, timeout=900))


def test_fsdp_preset_trains_evaluates_and_exports_on_gpus(tmp_path):
    devices = min(torch.cuda.device_count(), 2)
    run = tmp_path / "fsdp"
    gpu_fit(run, "--config", FSDP_PRESET, "--trainer.devices", str(devices),
            "--trainer.gradient_clip_val", "1.0")
    assert (run / "checkpoints" / "last.ckpt").is_dir()
    assert (run / "hf" / "epoch=2" / "model.safetensors").exists()
    for name in ("benchmark", "extraction", "likelihood"):
        assert len(evaluations(run, name)) == 3, name


def test_one_gpu_bf16_with_clipping_and_unfused_adamw(tmp_path):
    # fused AdamW cannot be clipped by Lightning: the student must fall back to the unfused one
    gpu_fit(tmp_path / "clip", "--trainer.accelerator", "gpu", "--trainer.devices", "1",
            "--trainer.precision", "bf16-mixed", "--trainer.gradient_clip_val", "1.0",
            "--trainer.callbacks=[]")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None,
                    reason="needs flash-attn (pip install flash-attn)")
def test_attention_auto_picks_flash_on_ampere_in_bf16(tmp_path):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("flash attention needs an Ampere or newer GPU")
    result = gpu_fit(tmp_path / "flash", "--trainer.accelerator", "gpu", "--trainer.devices",
                     "1", "--trainer.precision", "bf16-mixed", "--data.packing", "true",
                     "--trainer.callbacks=[]")
    assert "attention flash_attention_2" in result.stdout + result.stderr


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs bitsandbytes (pip install bitsandbytes)")
@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw"])
def test_bitsandbytes_optimizers_train_on_gpu(tmp_path, optimizer):
    gpu_fit(tmp_path / optimizer, "--trainer.accelerator", "gpu", "--trainer.devices", "1",
            "--trainer.precision", "bf16-mixed", "--model.optimizer", optimizer,
            "--trainer.callbacks=[]")
