"""selftrain.training.checks: settings this machine cannot run are refused up front, in one line.

Through ``selftrain fit`` (nothing loaded, nothing written), through the GPU-request check on
its own and through ``StudentLM``'s own checks; ``--model.attn_implementation auto`` resolves
to transformers' default on CPU.
"""

import lightning as L
import pytest
from helpers import FSDP_ON_CPU, FSDP_PRESET, fit_args, in_process, make_student, without_gpus

import selftrain.training.module
from selftrain.errors import SelftrainError
from selftrain.training.checks import check_gpu_request
from selftrain.training.module import StudentLM


@pytest.mark.parametrize("flags, message", [
    (["--trainer.strategy", "fsdp"], "--trainer.strategy fsdp needs CUDA GPUs; on CPU use"),
    (["--trainer.strategy", "fsdp_layers"], "fsdp_layers (DecoderLayerFSDP) needs CUDA GPUs"),
    (["--config", FSDP_PRESET], "--trainer.accelerator gpu: this machine has no CUDA GPU"),
    (["--model.attn_implementation", "flash_attention_2"], "flash-attn is not installed"),
    ([FSDP_ON_CPU, "--model.gradient_checkpointing", "true"],
     "set --model.gradient_checkpointing false"),
    (["--model.optimizer", "paged_adamw_8bit"], "bitsandbytes is not installed"),
], ids=["fsdp", "fsdp_layers", "fsdp-preset", "flash", "double-checkpointing", "bnb"])
def test_settings_this_machine_cannot_run_fail_in_one_line_before_loading(tmp_path, flags,
                                                                          message):
    run = tmp_path / "run"
    result = in_process(*fit_args(run, "--trainer.callbacks=[]", *flags))
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("selftrain: error:") and message in last, last
    assert "Traceback" not in result.stderr
    assert not run.exists()  # nothing written


@pytest.mark.parametrize("trainer, message", [
    ({"accelerator": "gpu"}, "--trainer.accelerator gpu: this machine has no CUDA GPU"),
    ({"accelerator": "cuda"}, "--trainer.accelerator cuda: this machine has no CUDA GPU"),
    ({"accelerator": "cpu", "strategy": "fsdp"}, "--trainer.strategy fsdp needs CUDA GPUs"),
    ({"strategy": "FSDP"}, "--trainer.strategy fsdp needs CUDA GPUs"),  # auto: the CPU here
    ({"accelerator": "cpu", "strategy": "ddp"}, None),
    ({}, None),
])
def test_a_gpu_request_without_a_gpu_is_refused(monkeypatch, trainer, message):
    without_gpus(monkeypatch)
    if message is None:
        check_gpu_request(trainer)
    else:
        with pytest.raises(SelftrainError, match=message):
            check_gpu_request(trainer)


@pytest.mark.parametrize("field, value, message", [
    ("optimizer", "adamw_8bit", "--model.optimizer adamw_8bit needs a CUDA GPU"),
    ("attn_implementation", "flash_attention_2", "needs a CUDA GPU; use sdpa"),
])
def test_gpu_only_module_settings_are_refused_on_cpu(monkeypatch, field, value, message):
    # as if present
    monkeypatch.setattr(selftrain.training.module, "check_installed", lambda *args: None)
    module = StudentLM(**{field: value})
    with pytest.raises(SelftrainError, match=message):
        module.check_machine(L.Trainer(accelerator="cpu", devices=1, logger=False))


def test_attention_auto_is_the_transformers_default_on_cpu():
    module = make_student()
    assert module.hparams.attn_implementation == "auto"
    assert module.model.config._attn_implementation == "sdpa"
