"""selftrain.training.fsdp: the decoder-layer wrap unit, the FSDP preset, sharded checkpoints.

FSDP runs for real here on 2 CPU processes (gloo) through ``allow_cpu``; the GPU run is in
``tests/test_gpu.py`` and ``scripts/bench/bench_train.py --strategy fsdp`` on a GPU machine.
Those runs also record the optimizer's parameter groups (:class:`RecordParamGroups`): FSDP's
flattened shards must be grouped as DDP's whole parameters are.
"""

import json
import os

import lightning as L
import pytest
import torch
from helpers import (
    DDP_PRESET,
    FSDP_ON_CPU,
    FSDP_PRESET,
    FailsToSave,
    cli,
    evaluations,
    flip_bytes,
    history,
    run_fit,
    succeeded,
    weight_distance,
)
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from selftrain.analysis.tb import read_scalars
from selftrain.digests import verify
from selftrain.errors import SelftrainError
from selftrain.models import load_model
from selftrain.training.fsdp import (
    DecoderLayerFSDP,
    clean_name,
    decoder_layer_classes,
    unsharded_copy,
)


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


def test_fsdp_preset_builds_the_strategy_and_its_policies_on_cpu():
    built = cli(None, "--config", FSDP_PRESET, "--trainer.accelerator", "cpu",
                "--trainer.devices", "1")
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


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_save_swaps_in_a_complete_checkpoint_or_keeps_the_old_one(tmp_path):
    strategy = DecoderLayerFSDP(allow_cpu=True)  # one process: no collective runs
    target = tmp_path / "last.ckpt"
    strategy.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, target)
    assert sorted(p.name for p in target.iterdir()) == [".metadata", "__0_0.distcp",
                                                        "digests.json", "meta.pt"]
    assert verify(target, "--ckpt_path")  # the digests of the shards, saved with them
    with pytest.raises(RuntimeError, match="disk full"):  # dies after the shards are written
        strategy.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "epoch": 2,
                                  "last": FailsToSave()}, target)
    assert torch.load(target / "meta.pt") == {"epoch": 1}
    strategy.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, target)
    assert torch.load(target / "meta.pt") == {"epoch": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no staging, no -previous
    assert verify(target, "--ckpt_path")
    flip_bytes(target / "__0_0.distcp", count=4)
    with pytest.raises(SelftrainError, match=r"__0_0\.distcp does not match its saved digest"):
        verify(target, "--ckpt_path")


class RecordParamGroups(L.Callback):
    """Writes the optimizer's groups to ``<run>/param_groups/rank<r>.json`` at train start.

    Loaded by class path in a ``selftrain fit`` subprocess (``test_fsdp.RecordParamGroups``,
    with ``tests`` on ``PYTHONPATH``). Each group: its weight decay and its parameters as
    ``[name, numel, ndim]``, names as the student's own (wrapper parts removed).
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = {id(p): clean_name(n) for n, p in pl_module.model.named_parameters()}
        optimizer = trainer.optimizers[0]
        record = {"optimizer": type(optimizer).__name__,
                  "groups": [{"weight_decay": group["weight_decay"],
                              "params": [[names[id(p)], p.numel(), p.ndim]
                                         for p in group["params"]]}
                             for group in optimizer.param_groups]}
        out = os.path.join(trainer.default_root_dir, "param_groups")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as file:
            json.dump(record, file)


def recorded_groups(run) -> list[dict]:
    """:class:`RecordParamGroups`' records of a run, rank 0 first."""
    return [json.loads((run / "param_groups" / f"rank{rank}.json").read_text())
            for rank in range(2)]


@pytest.fixture(scope="module")
def fsdp_and_ddp_runs(tmp_path_factory):
    """The debug config (all three evaluation callbacks) under each preset on 2 CPU ranks."""
    root = tmp_path_factory.mktemp("scale")
    runs = {"fsdp": root / "fsdp", "ddp": root / "ddp", "fsdp_chunked": root / "fsdp_chunked"}
    # the shipped presets, brought to CPU: 2 gloo processes, fp32
    on_cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "2",
              "--trainer.precision", "32-true"]
    fsdp = ["--config", FSDP_PRESET, *on_cpu, "--trainer.strategy.allow_cpu", "true"]
    presets = {"fsdp": fsdp, "ddp": ["--config", DDP_PRESET, *on_cpu],
               # the loss through the head in chunks, its head gathered by FSDP's root unit
               "fsdp_chunked": [*fsdp, "--model.loss_chunk", "64"]}
    tests = os.path.dirname(__file__)
    with pytest.MonkeyPatch.context() as patch:  # RecordParamGroups, imported by class path
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests,
                                                                 os.environ.get("PYTHONPATH")])))
        for name, flags in presets.items():
            # a clip small enough to act on every step: FSDP clips over all shards (global norm)
            # weight decay: FSDP has flattened the matrices by the time the optimizer is built
            succeeded(run_fit(runs[name], *flags, "--trainer.max_epochs", "2",
                              "--trainer.gradient_clip_val", "0.1", "--model.weight_decay", "0.1",
                              "--trainer.callbacks+=test_fsdp.RecordParamGroups"))
    return runs


@pytest.mark.slow
def test_the_chunked_loss_trains_under_fsdp_as_transformers_loss_does(fsdp_and_ddp_runs):
    plain, chunked = (read_scalars(fsdp_and_ddp_runs[name] / "tb")["train/loss"]
                      for name in ("fsdp", "fsdp_chunked"))
    assert len(plain) == len(chunked) == 24
    for (step, ours), (their_step, theirs) in zip(chunked, plain, strict=True):
        assert step == their_step and ours == pytest.approx(theirs, rel=1e-5), (step, ours,
                                                                                 theirs)


@pytest.mark.slow
def test_fsdp_groups_its_flattened_shards_as_ddp_groups_whole_parameters(fsdp_and_ddp_runs):
    whole = recorded_groups(fsdp_and_ddp_runs["ddp"])
    sharded = recorded_groups(fsdp_and_ddp_runs["fsdp"])
    assert whole[0] == whole[1]  # DDP: every rank holds the whole student
    decay, no_decay = whole[0]["groups"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert {ndim for _, _, ndim in decay["params"]} == {2}  # matrices decay
    assert {ndim for _, _, ndim in no_decay["params"]} == {1}  # norms and biases do not
    sizes = {name: numel for group in (decay, no_decay) for name, numel, _ in group["params"]}
    assert len(sizes) == len(decay["params"]) + len(no_decay["params"])  # each once

    for rank in sharded:
        assert rank["optimizer"] == whole[0]["optimizer"] == "AdamW"
        assert [g["weight_decay"] for g in rank["groups"]] == [0.1, 0.0]
        # flattened: every parameter is a 1-D piece of its rank's shard (some are empty), so
        # only the names recorded at load can tell a matrix from a norm
        assert {ndim for g in rank["groups"] for _, _, ndim in g["params"]} == {1}
        for group, expected in zip(rank["groups"], (decay, no_decay), strict=True):
            assert sorted(name for name, _, _ in group["params"]) == sorted(
                name for name, _, _ in expected["params"])
    # the two ranks' pieces of each parameter add up to the whole of it: nothing lost or doubled
    pieces = {name: 0 for name in sizes}
    for rank in sharded:
        for group in rank["groups"]:
            for name, numel, _ in group["params"]:
                pieces[name] += numel
    assert pieces == sizes


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
        assert evaluations(fsdp, name) == [0, 12, 24]
        for a, b in zip(history(fsdp, name), history(ddp, name), strict=True):
            assert a["metrics"].keys() == b["metrics"].keys()
            for key in a["metrics"]:
                assert a["metrics"][key] == pytest.approx(b["metrics"][key], abs=1e-5), key


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    """Both presets under bf16-mixed on 2 CPU ranks, :func:`fsdp_and_ddp_runs`' training flags.

    No evaluation callbacks: they read the weights and do not change them.
    """
    root = tmp_path_factory.mktemp("bf16")
    on_cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "2",
              "--trainer.precision", "bf16-mixed"]
    presets = {"fsdp": ["--config", FSDP_PRESET, *on_cpu, "--trainer.strategy.allow_cpu", "true"],
               "ddp": ["--config", DDP_PRESET, *on_cpu]}
    for name, flags in presets.items():
        succeeded(run_fit(root / name, *flags, "--trainer.max_epochs", "2",
                          "--trainer.gradient_clip_val", "0.1", "--model.weight_decay", "0.1",
                          callbacks=False))
    return {name: root / name for name in presets}


@pytest.mark.slow
def test_fsdp_in_bf16_stays_as_close_to_ddp_as_bf16_itself(fsdp_and_ddp_runs, bf16_runs):
    # bf16-mixed under FSDP runs the whole forward in bf16 weights (norms, loss, rotary
    # buffers) and reduces gradients in bf16, where DDP autocasts over float32 weights: the two
    # must still end about as close as DDP in bf16 ends to DDP in float32 (the noise floor of
    # bf16 itself). Measured on 2 AVX2 cores: gap 0.108, floor 0.082, moved 3.49; started from
    # other random weights, as DDP on a GPU did while tiny models were drawn on the default
    # device, the gap is 1.1 x moved (tests/test_gpu.py).
    ours, theirs, control = (
        load_file(run / "hf" / "epoch=2" / "model.safetensors")
        for run in (bf16_runs["fsdp"], bf16_runs["ddp"], fsdp_and_ddp_runs["ddp"]))
    base = load_model("tiny:qwen2").state_dict()
    gap, floor = weight_distance(ours, theirs), weight_distance(control, theirs)
    moved = weight_distance(theirs, base)
    figures = f"gap {gap:.4g}, bf16 control {floor:.4g}, moved {moved:.4g}"
    assert 0 < floor < 0.1 * moved, figures
    assert gap < 0.1 * moved and gap < 2 * floor, figures
    losses = [[v for _, v in read_scalars(run / "tb")["train/loss_epoch"]]
              for run in bf16_runs.values()]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3), f"FSDP {losses[0]}, DDP {losses[1]}"


@pytest.mark.slow
def test_fsdp_resumes_from_its_sharded_checkpoint(tmp_path):
    # a constant LR: the schedule's length depends on max_epochs, which the first leg changes
    flags = ["--trainer.devices", "2", FSDP_ON_CPU, "--model.schedule", "constant",
             "--model.warmup_ratio", "0", "--trainer.callbacks=[]"]
    succeeded(run_fit(tmp_path / "straight", *flags, "--trainer.max_epochs", "2"))
    run = tmp_path / "resumed"
    succeeded(run_fit(run, *flags, "--trainer.max_epochs", "1"))
    assert (run / "checkpoints" / "last.ckpt").is_dir()
    succeeded(run_fit(run, *flags, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    resumed = load_file(run / "hf" / "epoch=2" / "model.safetensors")
    reference = load_file(tmp_path / "straight" / "hf" / "epoch=2" / "model.safetensors")
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], atol=1e-6, rtol=0)
