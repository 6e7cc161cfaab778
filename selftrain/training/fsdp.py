"""FSDP for any transformers student: the wrap unit is the student's own decoder layer.

Lightning's ``FSDPStrategy`` takes its auto-wrap and activation-checkpointing policies as module
classes when the strategy is built, before the student exists; a config naming
``Qwen2DecoderLayer`` would break for the next family. :class:`DecoderLayerFSDP` resolves the
class from the loaded student (transformers' ``_no_split_modules``, else the repeated block of
its largest ``ModuleList``) at the moment Lightning wraps the model, so one preset serves Qwen,
Llama, GPT-NeoX and the rest. Checkpoints are sharded (one ``torch.distributed.checkpoint``
directory, every rank writes its own shard) unless ``state_dict_type: full``. Importing this
module registers the strategy as ``--trainer.strategy fsdp_layers``.

A sharded save lands whole or not at all: every rank writes into a staging directory and rank 0
swaps it in through :func:`selftrain.io.swap_into_place`.

Whatever reads whole weights (the HF export, the evaluation callbacks) gets them from
:func:`consolidated_state_dict`, a collective every rank enters, and :func:`unsharded_copy`
rebuilds a plain transformers model from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from selftrain.digests import write_dir_digests
from selftrain.errors import SelftrainError
from selftrain.io import fsync_tree, remove, swap_into_place

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
"""Name parts wrappers (FSDP, activation checkpointing, compile) insert into parameter names."""


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of the student's repeated decoder blocks, found on the loaded model.

    transformers names them in ``_no_split_modules`` (``["Qwen2DecoderLayer"]``); models without
    that list fall back to the class of the largest ``ModuleList`` of identical blocks.

    Args:
        model: the loaded student (a transformers causal LM).

    Raises:
        SelftrainError: when no repeated block can be found.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = {type(module) for module in model.modules() if type(module).__name__ in names}
    if found:
        return found
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len({type(m) for m in module}) == 1:
            if len(module) > len(best):
                best = list(module)
    if len(best) >= 2:
        return {type(best[0])}
    raise SelftrainError(f"cannot find the decoder-layer class of {type(model).__name__}: it has "
                         "no _no_split_modules and no ModuleList of repeated blocks; use "
                         "--trainer.strategy ddp")


def compile_decoder_layers(model: nn.Module) -> None:
    """``torch.compile`` each decoder layer in place (regional compilation).

    One compiled graph serves every layer, so compiling takes seconds; the layers keep their
    names and state-dict keys, and DDP or FSDP can wrap them afterwards.

    Args:
        model: the loaded student.
    """
    classes = tuple(decoder_layer_classes(model))
    for layer in [module for module in model.modules() if isinstance(module, classes)]:
        layer.compile()


class DecoderLayerFSDP(FSDPStrategy):
    """Lightning FSDP wrapping (and checkpointing) each decoder layer of whatever student loads.

    Mixed precision follows ``--trainer.precision`` (``bf16-mixed``: parameters gathered,
    computed and reduced in bf16, fp32 master weights kept sharded).

    Args:
        sharding_strategy: ``FULL_SHARD`` (parameters, gradients, optimizer state),
            ``SHARD_GRAD_OP`` (keeps parameters gathered between forward and backward),
            ``HYBRID_SHARD`` (full shard within a node, replicate across nodes) or ``NO_SHARD``.
        activation_checkpointing: recompute each decoder layer's activations in backward;
            leave ``--model.gradient_checkpointing`` off, this replaces it.
        state_dict_type: ``sharded`` checkpoints (a directory, written by every rank in
            parallel) or ``full`` (one file gathered on rank 0; slow and memory-hungry for
            big students).
        cpu_offload: keep sharded parameters and gradients in CPU memory (fits bigger students
            on fewer GPUs, much slower).
        limit_all_gathers: rate-limit parameter all-gathers so memory stays bounded.
        allow_cpu: run on CPU processes (gloo). FSDP is for GPUs; this exists so the sharded
            path can be tested on a machine without one.
        kwargs: passed to Lightning's ``FSDPStrategy`` (accelerator, devices, timeout, ...).
    """

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD",
                                   "NO_SHARD"] = "FULL_SHARD",
        activation_checkpointing: bool = True,
        state_dict_type: Literal["sharded", "full"] = "sharded",
        cpu_offload: bool = False,
        limit_all_gathers: bool = True,
        allow_cpu: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(sharding_strategy=sharding_strategy, state_dict_type=state_dict_type,
                         cpu_offload=cpu_offload, limit_all_gathers=limit_all_gathers, **kwargs)
        self.checkpoint_layers = activation_checkpointing
        self.sharded_checkpoints = state_dict_type == "sharded"
        self.allow_cpu = allow_cpu
        self.layer_classes: set[type[nn.Module]] = set()

    def check_machine(self) -> None:
        """Refuse a CPU run unless asked for; called before any model is loaded."""
        if self.root_device.type == "cpu" and not self.allow_cpu:
            raise SelftrainError(
                "--trainer.strategy fsdp_layers (DecoderLayerFSDP) needs CUDA GPUs; on CPU use "
                "--trainer.strategy ddp (configs/scale/ddp.yaml); to test the sharded path on "
                "CPU anyway, give the strategy with init_args allow_cpu: true")

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path,
                        storage_options: Any | None = None) -> None:
        """Sharded saves land whole or not at all.

        Lightning writes a sharded checkpoint into its directory in place, so a kill mid-save
        would leave new shards beside old metadata. Here every rank writes into a staging
        directory; rank 0 then swaps it in, the old checkpoint waiting as
        ``<name>-previous.ckpt`` (which ``--ckpt_path last`` still finds if the run dies
        before the new one is in place) until it is deleted.

        Args:
            checkpoint: the state Lightning gathered.
            filepath: the checkpoint path (rank 0's is used on every rank).
            storage_options: must be None under FSDP (Lightning's rule).
        """
        if not self.sharded_checkpoints:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = Path(self.broadcast(str(filepath)))
        staging = target.with_name(f".{target.name}.staging")
        if self.global_rank == 0:
            remove(staging)
        self.barrier("staging")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("saved")
        if self.global_rank == 0:
            write_dir_digests(staging)  # checked before the checkpoint is read back
            fsync_tree(staging)
            swap_into_place(staging, target,
                            previous=target.with_name(f"{target.stem}-previous{target.suffix}"))
        self.barrier("renamed")

    @override
    def setup_environment(self) -> None:
        self.check_machine()
        super().setup_environment()

    @override
    def setup(self, trainer: L.Trainer) -> None:
        """Set the policies from the loaded student, then let Lightning wrap it.

        Lightning calls this after ``configure_model`` has loaded the weights and before it
        wraps the model, the first moment the student's layer classes are known.

        Args:
            trainer: the Trainer being set up.
        """
        student = getattr(self.lightning_module, "model", None)
        if student is None:
            raise SelftrainError("DecoderLayerFSDP: the LightningModule has no loaded .model")
        self.configure_policies(student)
        super().setup(trainer)

    def configure_policies(self, student: nn.Module) -> set[type[nn.Module]]:
        """Set the wrap and activation-checkpointing policies from the loaded student.

        They fill what Lightning's ``auto_wrap_policy`` and ``activation_checkpointing_policy``
        arguments would, which are given when the strategy is built, before any student exists.

        Args:
            student: the transformers model (``LightningModule.model``).

        Returns:
            The decoder-layer classes that become FSDP units.
        """
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        self.layer_classes = decoder_layer_classes(student)
        classes = tuple(sorted(self.layer_classes, key=lambda c: c.__name__))
        self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(set(classes))
        if self.checkpoint_layers:
            # Lightning's private store of the activation-checkpointing arguments, which its
            # _setup_model applies after wrapping (checked against lightning 2.6.6)
            self._activation_checkpointing_kwargs = {
                "check_fn": lambda module: isinstance(module, classes)}
        rank_zero_info(f"FSDP: wrapping {', '.join(c.__name__ for c in classes)}"
                       f"{' with activation checkpointing' if self.checkpoint_layers else ''}")
        return self.layer_classes

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        """Lightning's wrapping; on CPU the model is wrapped first with the device torch needs.

        The one private hook overridden here (checked against lightning 2.6.6 and torch 2.13):
        Lightning passes ``device_id=root_device.index``, None on CPU, which torch's FSDP
        refuses without an accelerator. On CPU the model is wrapped here with
        ``device_id=cpu``; Lightning then finds it wrapped and does the rest as on a GPU
        (moving metrics, activation checkpointing).
        """
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = any(isinstance(module, FullyShardedDataParallel) for module in model.modules())
        if self.root_device.type == "cpu" and not wrapped:
            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=self.root_device,
                **self.kwargs)
            self.kwargs.pop("auto_wrap_policy", None)  # applied (Lightning warns if it is left)
        return super()._setup_model(model)


STRATEGY_NAME = "fsdp_layers"
"""``--trainer.strategy fsdp_layers``: :class:`DecoderLayerFSDP` with its defaults."""
if STRATEGY_NAME not in StrategyRegistry:
    StrategyRegistry.register(STRATEGY_NAME, DecoderLayerFSDP,
                              description="FSDP wrapping each decoder layer of the student")


def is_sharded(trainer: L.Trainer | None) -> bool:
    """Whether the Trainer's strategy shards the student's weights (FSDP)."""
    return trainer is not None and isinstance(trainer.strategy, FSDPStrategy)


def clean_name(name: str) -> str:
    """A parameter or buffer name without the parts wrappers insert."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def consolidated_state_dict(trainer: L.Trainer, attribute: str = "model",
                            rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """The student's full weights under FSDP, keyed as the unwrapped transformers model.

    A collective: every rank must call it.

    Args:
        trainer: a Trainer whose strategy is an ``FSDPStrategy`` (set up).
        attribute: the LightningModule attribute holding the transformers model.
        rank0_only: gather into CPU memory on rank 0 only (others get an empty dict);
            otherwise every rank gets the full weights on its device.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload gathers to rank 0 only; torch's offload path crashes (SIGSEGV) when the
    # weights already live in CPU memory, so there every rank gathers and the others drop it
    offload = rank0_only and trainer.strategy.root_device.type == "cuda"
    options = StateDictOptions(full_state_dict=True, cpu_offload=offload)
    state = get_model_state_dict(trainer.strategy.model, options=options)
    if rank0_only and not trainer.is_global_zero:
        return {}
    prefix = f"{attribute}."
    return {clean_name(key)[len(prefix):]: value for key, value in state.items()
            if clean_name(key).startswith(prefix)}


def unsharded_copy(sharded: nn.Module, state_dict: dict[str, torch.Tensor],
                   dtype: torch.dtype | None = None) -> nn.Module:
    """A plain transformers model with the given weights, built beside a sharded one.

    Parameters are created empty and take the tensors of ``state_dict`` (no copy, no random
    init); buffers the state dict does not hold (rotary frequencies) are built as usual.

    Args:
        sharded: the student as FSDP left it (its config and buffers are read).
        state_dict: full weights from :func:`consolidated_state_dict`; consumed (emptied).
        dtype: cast the copy to this dtype (None keeps the state dict's).
    """
    from accelerate import init_empty_weights

    if dtype is not None:  # cast tensor by tensor: one full copy in memory, not two
        for key in list(state_dict):
            state_dict[key] = state_dict[key].to(dtype)
    with init_empty_weights(include_buffers=False):  # same class (remote code too), same config
        copy = type(sharded)(sharded.config)
    missing, unexpected = copy.load_state_dict(state_dict, strict=False, assign=True)
    tied = set(getattr(copy, "all_tied_weights_keys", None) or {}) | set(
        getattr(copy, "_tied_weights_keys", None) or [])
    if unexpected or [key for key in missing if key not in tied]:
        raise SelftrainError(f"consolidated weights do not fit {type(copy).__name__}: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}")
    copy.tie_weights()
    device = next(iter(state_dict.values())).device
    copy = copy.to(device=device, dtype=dtype) if dtype is not None else copy.to(device)
    state_dict.clear()  # the copy holds the tensors now (or their casts); free the originals
    copy.generation_config = sharded.generation_config
    return copy.eval()
