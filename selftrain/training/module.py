"""`StudentLM`: the causal-LM student as a LightningModule.

The student is any transformers causal LM resolved by :mod:`selftrain.models`. The module owns
the loss (next-token cross-entropy over real tokens only; padding carries label -100) and the
``train/*`` TensorBoard scalars, and wires in what lives beside it: AdamW with warmup and a
cosine or constant schedule (:mod:`selftrain.training.optim`), the checks of its settings
against the installation and the machine (:mod:`selftrain.training.checks`) and the HF-format
export ``<run>/hf/epoch=N`` (:mod:`selftrain.training.export`). Precision, devices and strategy
come from the Trainer.

The weights are loaded in :meth:`configure_model`, not ``__init__``, so parsing a config (or
``--help``) never downloads or dequantizes anything, and sharded strategies can wrap the model
as it is built.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from selftrain.errors import SelftrainError
from selftrain.models import load_model, load_tokenizer, parse_model_spec, tokenizer_fingerprint
from selftrain.training.batching import BATCH_KEYS, documents, real_tokens
from selftrain.training.checks import check_installed, check_machine, resolve_attention
from selftrain.training.export import EXPORT_INFO, export_dir, export_student
from selftrain.training.fsdp import compile_decoder_layers, is_sharded
from selftrain.training.loss import (
    LossKernel,
    causal_lm_loss,
    check_loss_flags,
    chunked_loss_refusal,
    uses_liger,
)
from selftrain.training.optim import build_optimizer, lr_schedule, param_groups
from selftrain.training.run_dir import IDENTITY_KEY, run_identity


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in backward (non-reentrant checkpoints).

    transformers 5.24 calls this ``activation_checkpointing_enable`` and deprecates
    ``gradient_checkpointing_enable`` (to be removed in v6); releases without the new name
    get the old one.

    Args:
        model: the loaded student.
    """
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


class StudentLM(L.LightningModule):
    """Fine-tunes a causal LM on a corpus, many epochs, logging to TensorBoard.

    Args:
        model: student model spec: hub id, local HF dir, embedded:smollm2-135m, tiny:<family>
            or shape:<name> (real size, random weights).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to matrices only (not norms or biases).
        betas: AdamW betas.
        warmup_ratio: share of all optimizer steps spent warming up linearly from 0.
        warmup_steps: warmup length in steps; overrides ``warmup_ratio`` when set.
        schedule: ``cosine`` decays to ``min_lr_ratio * lr`` at the last step; ``constant``
            holds ``lr`` after warmup.
        min_lr_ratio: floor of the cosine schedule, as a share of ``lr``.
        gradient_checkpointing: recompute activations in backward to save memory (under
            ``DecoderLayerFSDP`` use its ``activation_checkpointing`` instead).
        attn_implementation: ``auto`` (``flash_attention_2`` when flash-attn is installed and
            the student trains on a CUDA GPU, else transformers' default, SDPA for most
            models), ``sdpa``, ``eager`` or ``flash_attention_2``.
        optimizer: ``adamw`` (torch's, its fused kernel on CUDA), or bitsandbytes'
            ``adamw_8bit``, ``paged_adamw_8bit`` (8-bit states: about 1/4 of the optimizer
            memory) or ``paged_adamw`` (states paged to CPU under memory pressure); the
            bitsandbytes ones need a CUDA GPU and ``pip install bitsandbytes``.
        compile: ``torch.compile`` each decoder layer (regional compilation: one compiled
            graph serves every layer, so compiling takes seconds, and it composes with DDP
            and FSDP wrapping); the first steps are slow while it compiles.
        loss_chunk: compute the loss through the LM head this many tokens at a time
            (:mod:`selftrain.training.loss`), so the whole ``batch x sequence x vocabulary``
            logits never exist: the loss's memory no longer grows with the batch. None keeps
            transformers' own loss. A chunk's float32 logits take chunk x vocabulary x 4
            bytes (1024 x 151,936 for Qwen2.5: 594 MiB).
        loss_kernel: with ``loss_chunk``: ``auto`` (Liger's fused linear cross-entropy on a
            CUDA GPU when ``liger-kernel`` is installed, else the chunked torch loss),
            ``torch`` (always the chunked torch loss) or ``liger`` (refused where it cannot
            run).
        export_hf: write HF weights + tokenizer to ``<run>/hf/epoch=N``: ``last`` at the end
            of training, ``every_epoch``, or ``never``.
        revision: hub revision (branch, tag or commit) of the student.
        trust_remote_code: allow the student's repository code (off unless asked).
    """

    def __init__(
        self,
        model: str = "tiny:qwen2",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_ratio: float = 0.03,
        warmup_steps: int | None = None,
        schedule: Literal["cosine", "constant"] = "cosine",
        min_lr_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] | None = "auto",
        optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw"] = "adamw",
        compile: bool = False,
        loss_chunk: int | None = None,
        loss_kernel: LossKernel = "auto",
        export_hf: Literal["last", "every_epoch", "never"] = "last",
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        parse_model_spec(model, flag="--model.model")
        if lr <= 0:
            raise SelftrainError(f"--model.lr {lr}: must be > 0")
        if not 0 <= warmup_ratio < 1:
            raise SelftrainError(f"--model.warmup_ratio {warmup_ratio}: must be in [0, 1)")
        if warmup_steps is not None and warmup_steps < 0:
            raise SelftrainError(f"--model.warmup_steps {warmup_steps}: must be >= 0")
        if not 0 <= min_lr_ratio <= 1:
            raise SelftrainError(f"--model.min_lr_ratio {min_lr_ratio}: must be in [0, 1]")
        check_installed(attn_implementation, optimizer)
        check_loss_flags(loss_chunk, loss_kernel)
        self.save_hyperparameters()
        self.model = None
        self.tokenizer = None
        self._last_batch_end: float | None = None
        self._exported_step = -1
        self._matrices: set[str] = set()
        self._last_finite: tuple[int, float] | None = None
        """(global step, loss) of the last training step whose loss was finite."""
        self._fused_loss: bool | None = None
        """Whether the chunked loss goes through Liger's kernel; decided at the first batch."""
        self.run_identity: dict[str, str] | None = None
        """The run this student trains (:func:`selftrain.training.run_dir.run_identity`)."""

    @override
    def configure_model(self) -> None:
        """Load the student's weights and tokenizer (once, on every rank)."""
        if self.model is not None:
            return
        hp = self.hparams
        self.load_tokenizer()
        attention = resolve_attention(hp.attn_implementation, self.attached_trainer())
        self.model = load_model(hp.model, attn_implementation=attention,
                                revision=hp.revision, trust_remote_code=hp.trust_remote_code,
                                flag="--model.model")
        rank_zero_info(f"student {hp.model}: attention {self.model.config._attn_implementation}")
        self._matrices = {name for name, p in self.model.named_parameters() if p.ndim >= 2}
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        if hp.compile:
            compile_decoder_layers(self.model)
        self.model.train()

    def attached_trainer(self) -> L.Trainer | None:
        """The Trainer this module is attached to; None for a bare module (tests load one).

        Lightning's ``trainer`` property raises where there is none.
        """
        try:
            return self.trainer
        except RuntimeError:
            return None

    def check_machine(self, trainer: L.Trainer) -> None:
        """Refuse settings the Trainer's device cannot run, before any weights are loaded.

        Args:
            trainer: the Trainer that will fit this module.
        """
        hp = self.hparams
        check_machine(trainer, hp.optimizer, hp.attn_implementation, hp.gradient_checkpointing)
        if hp.loss_chunk is not None:  # a Liger kernel asked for where it cannot run
            uses_liger(hp.loss_kernel, trainer.strategy.root_device, config=None)

    def load_tokenizer(self):
        """The student's tokenizer, loaded on first use.

        Callbacks check their inputs with it before the weights are loaded.
        """
        if self.tokenizer is None:
            hp = self.hparams
            self.tokenizer = load_tokenizer(hp.model, hp.revision, hp.trust_remote_code,
                                            flag="--model.model")
        return self.tokenizer

    def identity(self, rows: list[dict]) -> dict[str, str]:
        """The identity of a run of this student on ``rows``, recorded in every checkpoint.

        Args:
            rows: the training rows (``CorpusDataModule.rows``).
        """
        hp = self.hparams
        spec = parse_model_spec(hp.model, flag="--model.model")
        name = (str(Path(spec.name).resolve()) if spec.kind == "hub" and Path(spec.name).exists()
                else str(spec))
        return run_identity(name, hp.revision, tokenizer_fingerprint(self.load_tokenizer()), rows)

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the run's identity, so a resume on other inputs is refused."""
        if self.run_identity is None:
            rows = getattr(self.trainer.datamodule, "rows", None)
            if rows:
                self.run_identity = self.identity(rows)
        if self.run_identity is not None:
            checkpoint[IDENTITY_KEY] = self.run_identity

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits of the student."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False).logits

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over real tokens (labels -100 are padding).

        A padded batch carries ``attention_mask``; a packed one (documents concatenated into
        one row) carries ``position_ids`` restarting at 0 per document instead, from which
        transformers keeps attention inside each document. With ``--model.loss_chunk`` the
        same loss goes through the LM head a chunk of tokens at a time.
        """
        inputs = {key: batch[key] for key in BATCH_KEYS if key in batch}
        hp = self.hparams
        if hp.loss_chunk is None:
            return self.model(**inputs, use_cache=False).loss
        if self._fused_loss is None:  # where the weights are now, after any wrapping
            device = batch["input_ids"].device
            self._fused_loss = uses_liger(hp.loss_kernel, device, self.model.config)
            rank_zero_info("loss: Liger's fused linear cross-entropy" if self._fused_loss else
                           f"loss: chunked linear cross-entropy, {hp.loss_chunk} tokens a chunk")
            self._check_chunked_loss(inputs)
        return causal_lm_loss(self.model, inputs, hp.loss_chunk, fused=self._fused_loss)

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self._stop_unless_finite(loss)
        size = documents(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True,
                 batch_size=size)
        self.log("train/real_token_fraction", real_tokens(batch) / batch["input_ids"].numel(),
                 on_step=True, batch_size=size)
        return loss

    def _all_ranks_agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (one boolean all-reduce when there are several).

        Args:
            ok: this rank's answer.
        """
        trainer = self.attached_trainer()
        if trainer is not None and trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(ok, all=True))
        return ok

    def _check_chunked_loss(self, batch: dict[str, torch.Tensor]) -> None:
        """Refuse, in one line, a student whose loss the chunks do not reproduce (first batch).

        Every rank scores its own first batch and all decide together (one boolean
        all-reduce), so a refusal on one rank stops them all instead of leaving the others in a
        collective.
        """
        refusal = chunked_loss_refusal(self.model, batch, self.hparams.loss_chunk,
                                       fused=bool(self._fused_loss))
        if not self._all_ranks_agree(refusal is None):
            raise SelftrainError(refusal or f"--model.loss_chunk {self.hparams.loss_chunk}: "
                                 "another rank's first batch scores another loss by the chunks "
                                 "than by transformers; unset --model.loss_chunk")

    def _stop_unless_finite(self, loss: torch.Tensor) -> None:
        """Stop the run at a non-finite loss, before it reaches the weights, in one line.

        Every rank decides together (one boolean all-reduce), so a NaN on one rank stops them
        all at the same step instead of leaving the others waiting in a collective. The step
        is not taken, so the weights, the checkpoints and the exports stay finite.
        """
        if self._all_ranks_agree(bool(torch.isfinite(loss.detach()).all())):
            self._last_finite = (self.global_step, float(loss.detach()))
            return
        last = ("no finite loss before it" if self._last_finite is None else
                f"the last finite loss was {self._last_finite[1]:.4g} at step "
                f"{self._last_finite[0]}")
        checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or None
        then = (f"resume from the last checkpoint, {checkpoint}, with --ckpt_path" if checkpoint
                else "start over (no checkpoint was written yet)")
        raise SelftrainError(f"--model.lr {self.hparams.lr:g}: the training loss is not finite "
                             f"({float(loss.detach())}) at step {self.global_step}; {last}. "
                             f"Lower --model.lr (or check the corpus), then {then}")

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._log_eval_loss("val", batch)

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._log_eval_loss("test", batch)

    def _log_eval_loss(self, stage: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token-weighted mean NLL over the held-out corpus (weights survive DDP reduction)."""
        loss = self._loss(batch)
        targets = int((batch["labels"][:, 1:] != -100).sum())
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=targets, prog_bar=True)
        return loss

    @override
    def on_train_epoch_start(self) -> None:
        self._last_batch_end = time.perf_counter()

    @override
    def on_train_batch_end(self, outputs, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            tokens = real_tokens(batch)
            self.log("train/tokens_per_sec", tokens / max(now - self._last_batch_end, 1e-9),
                     on_step=True, prog_bar=True, sync_dist=True, reduce_fx="sum",
                     batch_size=documents(batch))
        self._last_batch_end = now

    @override
    def configure_optimizers(self):
        hp = self.hparams
        # FSDP has flattened every parameter into a 1-D shard by now: decide by the names
        # of the matrices recorded when the student was loaded
        groups = param_groups(self.model, hp.weight_decay, self._matrices or None)
        trainer = self.trainer
        # fused AdamW: CUDA only, and Lightning clips and unscales gradients only for unfused
        fused = (all(p.is_cuda for group in groups for p in group["params"])
                 and not trainer.gradient_clip_val and not str(trainer.precision).startswith("16"))
        optimizer = build_optimizer(hp.optimizer, groups, lr=hp.lr, betas=tuple(hp.betas),
                                    fused=fused)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = hp.warmup_steps if hp.warmup_steps is not None else round(hp.warmup_ratio * total)
        schedule = lr_schedule(optimizer, total, warmup, hp.schedule, hp.min_lr_ratio)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1}}

    @override
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None
                       ) -> None:
        """Step, then free the gradients at once.

        Lightning zeroes them inside the next step's closure, after its forward, so a whole
        fp32 copy of the gradients would otherwise stay allocated through every forward.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    @override
    def configure_gradient_clipping(self, optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by global norm; under FSDP through the root module, which sees every shard."""
        if (is_sharded(self.trainer) and gradient_clip_val
                and gradient_clip_algorithm in (None, "norm")):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @override
    def on_train_epoch_end(self) -> None:
        if self.hparams.export_hf == "every_epoch":
            self.export_hf(self.current_epoch + 1)

    @override
    def on_train_end(self) -> None:
        if self.hparams.export_hf != "never" and self._exported_step != self.global_step:
            self.export_hf(self.trainer.fit_loop.epoch_progress.current.completed)

    @override
    def on_fit_end(self) -> None:
        """Write the final export if a finished fit lacks it: the resume of a killed export.

        A fit killed (or interrupted) while it wrote its last export resumes from the
        checkpoint of its last epoch, which Lightning finds complete: it trains nothing and
        calls no ``on_train_end``, but it does end here, with the checkpoint's weights loaded.
        Rank 0 decides (it writes the exports), and every rank takes part in the export.
        """
        if self.hparams.export_hf == "never" or self.global_step == 0:
            return  # nothing trained, nothing to export
        epoch = self.trainer.fit_loop.epoch_progress.current.completed
        missing = not (export_dir(self.trainer, epoch) / EXPORT_INFO).is_file()
        if self.trainer.strategy.broadcast(missing, src=0):
            rank_zero_info(f"training is complete but hf/epoch={epoch} is missing (its export "
                           "was interrupted): exporting it from the checkpoint")
            self.export_hf(epoch)

    def export_hf(self, epoch: int) -> Path | None:
        """Write HF weights + tokenizer to ``<run>/hf/epoch=N`` atomically (global rank 0).

        Every rank calls it (under FSDP they gather the full weights together).

        Args:
            epoch: epochs completed; 0 would be the base model.

        Returns:
            The export directory on rank 0, None elsewhere.
        """
        self._exported_step = self.global_step
        info = {"student": self.hparams.model, "epoch": epoch, "global_step": self.global_step}
        layout = getattr(self.trainer.datamodule, "pair_layout", None)
        if layout:  # an SBP synthesizer: `selftrain synthesize` prompts with the same layout
            info["pair_layout"] = layout
        return export_student(self.trainer, self.model, self.tokenizer, info, epoch)
