"""Scale options: FSDP strategy and wrap policy from config, optimizers, attention, compile.

FSDP runs for real here on 2 CPU processes (gloo) through ``allow_cpu``; the GPU run is
``scripts/bench_train.py --strategy fsdp`` on a GPU machine.
"""

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from conftest import CONFIGS, REPO
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import selftrain.training.module
from selftrain.errors import SelftrainError
from selftrain.models import load_model
from selftrain.trainer_cli import SelftrainCLI
from selftrain.training.fsdp import DecoderLayerFSDP, decoder_layer_classes, unsharded_copy
from selftrain.training.module import StudentLM, build_optimizer

DEBUG = str(CONFIGS / "debug.yaml")
FSDP_PRESET = str(CONFIGS / "scale" / "fsdp.yaml")
DDP_PRESET = str(CONFIGS / "scale" / "ddp.yaml")
FSDP_ON_CPU = ('--trainer.strategy={"class_path": "selftrain.training.fsdp.DecoderLayerFSDP", '
               '"init_args": {"allow_cpu": true}}')


@pytest.mark.parametrize("family, expected", [("qwen2", "Qwen2DecoderLayer"),
                                              ("llama", "LlamaDecoderLayer"),
                                              ("gpt_neox", "GPTNeoXLayer")])
def test_decoder_layer_class_is_resolved_from_the_loaded_model(family, expected):
    model = load_model(f"tiny:{family}")
    assert {cls.__name__ for cls in decoder_layer_classes(model)} == {expected}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)


class NoHints(nn.Module):
    """A model without transformers' _no_split_modules: the repeated block is found."""

    def __init__(self, blocks=3):
        super().__init__()
        self.head = nn.ModuleList([nn.Linear(4, 4)])
        self.blocks = nn.ModuleList([Block() for _ in range(blocks)])


def test_decoder_layer_class_falls_back_to_the_repeated_block():
    assert decoder_layer_classes(NoHints()) == {Block}
    with pytest.raises(SelftrainError, match="cannot find the decoder-layer class"):
        decoder_layer_classes(NoHints(blocks=1))


@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt_neox"])
def test_unsharded_copy_rebuilds_the_student_from_full_weights(family):
    model = load_model(f"tiny:{family}").eval()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    copy = unsharded_copy(model, state, dtype=torch.bfloat16)
    assert copy is not model and type(copy) is type(model)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in copy.parameters())
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        expected = model.to(torch.bfloat16)(ids).logits
        torch.testing.assert_close(copy(ids).logits, expected, atol=0, rtol=0)
    assert not state  # consumed: the copy holds the tensors
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    del state[next(n for n in state if "layers.0" in n)]
    with pytest.raises(SelftrainError, match="consolidated weights do not fit"):
        unsharded_copy(model, state)


def cli(*flags):
    return SelftrainCLI(args=["--config", DEBUG, *flags], run=False)


def test_fsdp_preset_builds_the_strategy_and_its_policies_on_cpu():
    built = cli("--config", FSDP_PRESET, "--trainer.accelerator", "cpu", "--trainer.devices", "1")
    strategy = built.trainer.strategy
    assert isinstance(strategy, DecoderLayerFSDP)
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    assert strategy._state_dict_type == "sharded" and strategy.checkpoint_layers
    assert strategy.mixed_precision_config.param_dtype == torch.bfloat16  # bf16-mixed preset
    assert built.model.hparams.gradient_checkpointing is False
    with pytest.raises(SelftrainError, match="needs CUDA GPUs; on CPU use --trainer.strategy ddp"):
        strategy.check_machine()

    student = load_model("tiny:llama")
    classes = strategy.configure_policies(student)
    assert {cls.__name__ for cls in classes} == {"LlamaDecoderLayer"}
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == classes
    check = strategy._activation_checkpointing_kwargs["check_fn"]
    assert check(student.model.layers[0]) and not check(student.model.embed_tokens)


def test_ddp_preset_parses_with_an_experiment_config():
    built = cli("--config", DDP_PRESET, "--trainer.accelerator", "cpu", "--trainer.devices", "1")
    assert built.trainer.strategy.__class__.__name__ == "DDPStrategy"
    assert built.trainer.strategy._ddp_kwargs["gradient_as_bucket_view"] is True


def run_fit(run_dir, *flags, timeout=600):
    return subprocess.run([sys.executable, "-m", "selftrain", "fit", "--config", DEBUG,
                           "--trainer.default_root_dir", str(run_dir),
                           "--trainer.enable_progress_bar", "false", *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


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
    result = run_fit(run, "--trainer.callbacks=[]", *flags, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("selftrain: error:") and message in last, last
    assert "Traceback" not in result.stderr
    assert not run.exists()  # nothing written


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
    module = StudentLM(model="tiny:qwen2")
    module.configure_model()
    assert module.hparams.attn_implementation == "auto"
    assert module.model.config._attn_implementation == "sdpa"


def test_adamw_keeps_decay_off_norms_and_biases():
    model = load_model("tiny:qwen2")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = build_optimizer("adamw", [{"params": decay, "weight_decay": 0.1},
                                          {"params": rest, "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.95))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


@pytest.mark.slow
def test_compile_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (4, 32))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    results = []
    for compiled in (False, True):
        module = StudentLM(model="tiny:qwen2", compile=compiled)
        module.configure_model()
        layers = module.model.model.layers
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
        loss = module._loss(batch)
        loss.backward()
        results.append((loss.detach(), layers[0].mlp.up_proj.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


@pytest.fixture(scope="module")
def fsdp_and_ddp_runs(tmp_path_factory):
    """The debug config (all three evaluation callbacks) under each preset on 2 CPU ranks."""
    root = tmp_path_factory.mktemp("scale")
    runs = {"fsdp": root / "fsdp", "ddp": root / "ddp"}
    # the shipped presets, brought to CPU: 2 gloo processes, fp32
    on_cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "2",
              "--trainer.precision", "32-true"]
    presets = {"fsdp": ["--config", FSDP_PRESET, *on_cpu, "--trainer.strategy.allow_cpu", "true"],
               "ddp": ["--config", DDP_PRESET, *on_cpu]}
    for name, flags in presets.items():
        # a clip small enough to act on every step: FSDP clips over all shards (global norm)
        # weight decay: FSDP has flattened the matrices by the time the optimizer is built
        result = run_fit(runs[name], *flags, "--trainer.max_epochs", "2",
                         "--trainer.gradient_clip_val", "0.1", "--model.weight_decay", "0.1")
        assert result.returncode == 0, result.stderr[-3000:]
    return runs


def history(run, name):
    return [json.loads(line) for line in (run / "eval" / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_ddp_and_exports_whole_weights(fsdp_and_ddp_runs):
    fsdp, ddp = fsdp_and_ddp_runs["fsdp"], fsdp_and_ddp_runs["ddp"]
    # sharded checkpoint: a directory with one shard per rank
    shards = sorted(p.name for p in (fsdp / "checkpoints" / "last.ckpt").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (fsdp / "checkpoints").iterdir()) == ["last.ckpt"]  # swapped
    # the consolidated export loads with from_pretrained and equals the DDP run's weights
    export = fsdp / "hf" / "epoch=2"
    ours, theirs = (load_file(run / "hf" / "epoch=2" / "model.safetensors")
                    for run in (fsdp, ddp))
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=0)  # norm order
    base = load_model("tiny:qwen2").state_dict()
    assert any(not torch.equal(ours[n], base[n]) for n in ours)  # it did train
    loaded = AutoModelForCausalLM.from_pretrained(export).state_dict()
    for name in ours:
        assert torch.equal(loaded[name], ours[name]), name
    # every evaluation callback ran on the gathered weights: same numbers as DDP
    for name in ("benchmark", "extraction", "likelihood"):
        ours_h, theirs_h = history(fsdp, name), history(ddp, name)
        assert [h["global_step"] for h in ours_h] == [0, 12, 24]
        for a, b in zip(ours_h, theirs_h, strict=True):
            assert a["metrics"].keys() == b["metrics"].keys()
            for key in a["metrics"]:
                assert a["metrics"][key] == pytest.approx(b["metrics"][key], abs=1e-5), key


@pytest.mark.slow
def test_fsdp_resumes_from_its_sharded_checkpoint(tmp_path):
    # a constant LR: the schedule's length depends on max_epochs, which the first leg changes
    flags = ["--trainer.devices", "2", FSDP_ON_CPU, "--model.schedule", "constant",
             "--model.warmup_ratio", "0", "--trainer.callbacks=[]"]
    straight = run_fit(tmp_path / "straight", *flags, "--trainer.max_epochs", "2")
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = tmp_path / "resumed"
    first = run_fit(run, *flags, "--trainer.max_epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_dir()
    second = run_fit(run, *flags, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = load_file(run / "hf" / "epoch=2" / "model.safetensors")
    reference = load_file(tmp_path / "straight" / "hf" / "epoch=2" / "model.safetensors")
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], atol=1e-6, rtol=0)
