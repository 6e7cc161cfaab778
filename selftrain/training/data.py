"""`CorpusDataModule`: turns a corpus into length-grouped batches for the student.

It reads a corpus dir (or a plain jsonl / parquet / txt file) and turns its rows into the
student's token ids with :func:`selftrain.training.rows.build_rows` (one of K disjoint subsets
if asked, stored ``input_ids`` reused when the student's tokenizer is the source's, else
``text`` retokenized with the student's BOS). Two more layouts serve Synthetic Bootstrapped
Pretraining there: a pairs dir (``selftrain pairs``) as the corpus trains a synthesizer, and
several corpora with ``mixture_weights`` are mixed by token share at a token budget (real and
synthetic data together, or the real data alone repeated as the baseline).

This module holds the rest: the arguments (the CLI's ``--data.*`` flags, checked before any
file is read), the loaders and their state. Batching is in :mod:`selftrain.training.batching`:
deterministic per epoch, rank-aware, resumable mid-epoch. With ``packing`` each batch's rows go
end to end into one row (:mod:`selftrain.training.packing`) instead of being padded; the
batches themselves are the same.
"""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from selftrain.errors import SelftrainError, refuse_first_failed
from selftrain.inputs import check_seed
from selftrain.models import check_token_id, load_tokenizer, pad_token_id, parse_model_spec
from selftrain.synthesis.layout import DEFAULT_SEPARATOR
from selftrain.training.batching import LengthGroupedBatchSampler, pad_collate
from selftrain.training.mixture import check_weights
from selftrain.training.packing import pack_collate, packing_support
from selftrain.training.rows import RowSettings, build_rows

# Without --data.eval_corpus, val_dataloader returns no loaders, which is how Lightning is told
# to skip validation; its warning about that says nothing the user needs to act on.
warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
# The position inside an epoch is checkpointed by the DataModule (state_dict below), not by
# the DataLoader, so Lightning's "dataloader is not resumable" warning does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")


class CorpusDataModule(L.LightningDataModule):
    """Streams a BOS-sampled (or replay) corpus to the student.

    Args:
        corpus: corpus dir (manifest.json + data/*.parquet) or a .jsonl/.parquet/.txt file;
            or a list of them, trained on together (their rows concatenated), as
            ``selftrain sweep`` does in ``mode: accumulate``. In a list, ``subset`` selects
            in each corpus except those a model sampled for one student (``kind`` synthetic
            or sbp and ``num_subsets: 1`` in their manifest), which are taken whole. A pairs
            dir (``selftrain pairs``) trains an SBP synthesizer: ``BOS d1 SEP d2 EOS`` rows,
            loss on d2 only.
        tokenizer: the student's model spec; under ``selftrain fit`` it is linked to
            ``--model.model`` and set for you.
        max_length: longest training sequence in tokens, BOS included; longer rows are cut.
        batch_size: sequences per batch on each device.
        subset: train on subset k only (0..K-1); None uses every row.
        num_subsets: K; None takes the corpus's own ``subset`` column. A different K
            re-partitions rows by position (row i -> i mod K).
        same_tokenizer: whether the corpus ids are the student's; None decides by comparing
            the manifest's tokenizer fingerprint with the student's.
        bos_token_id: override the student's BOS id used when retokenizing.
        shuffle: reshuffle each epoch (seeded by ``seed`` and the epoch).
        seed: data order seed.
        group_batches: batches per length-sorted group; larger pads less, mixes less;
            0 sorts the whole epoch.
        pad_to_multiple_of: round padded lengths up (8 helps tensor cores on GPUs).
        num_workers: DataLoader workers (rows are pre-tokenized; 0 is usually enough).
        min_real_token_fraction: warn when padding makes the real-token share fall below
            (silent with ``packing``, which pads nothing).
        packing: concatenate each batch's documents into one row without padding; attention
            stays within each document through position ids; falls back to exact padding,
            with one warning, where the student's attention implementation cannot keep
            documents apart. Same batches, same targets, same loss as padding. Saves the
            padding's compute with flash attention; with sdpa/eager the mask is dense over
            the packed row, which costs more than light padding (see selftrain.training.packing).
        eval_corpus: held-out corpus (same formats) for ``selftrain validate`` / ``test`` and
            the per-epoch ``val/loss`` during ``fit``; None trains without one.
        revision: hub revision of the student's tokenizer; under ``selftrain fit`` linked to
            ``--model.revision``.
        pair_separator: text between d1 and d2 in the rows of a pairs dir; must encode to at
            least one token and decode back to itself. Recorded in every export, where
            ``selftrain synthesize`` reads it.
        mixture_weights: one weight per corpus of ``corpus``: corpus j gets the share
            w_j / sum(w) of an epoch's tokens (rows repeated only where its share asks for
            more than it has). None concatenates the corpora as they are.
        mixture_tokens: an epoch's tokens under ``mixture_weights``; None takes the largest
            budget that repeats no corpus. ``corpus: [real]``, ``mixture_weights: [1]`` and the
            token count of an SBP mixture is its repetition baseline.
        ended_only: keep only the training documents of a sampled corpus (``generate``,
            ``synthesize``) that ended on EOS (its ``finished`` column), and log how many went:
            a document cut at the length cap teaches a student that documents do not end.
            Real text and the held-out corpus are taken whole.
    """

    def __init__(
        self,
        corpus: str | list[str],
        tokenizer: str = "tiny:qwen2",
        max_length: int = 512,
        batch_size: int = 8,
        subset: int | None = None,
        num_subsets: int | None = None,
        same_tokenizer: bool | None = None,
        bos_token_id: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        group_batches: int = 64,
        pad_to_multiple_of: int = 1,
        num_workers: int = 0,
        min_real_token_fraction: float = 0.95,
        eval_corpus: str | None = None,
        packing: bool = False,
        revision: str | None = None,
        pair_separator: str = DEFAULT_SEPARATOR,
        mixture_weights: list[float] | None = None,
        mixture_tokens: int | None = None,
        ended_only: bool = False,
    ) -> None:
        super().__init__()
        _check_arguments(locals())
        self.save_hyperparameters()
        self.rows: list[dict[str, Any]] = []
        self.eval_rows: list[dict[str, Any]] = []
        self._train_sampler: LengthGroupedBatchSampler | None = None
        self._resume: dict[str, int] | None = None
        self.stats: dict[str, Any] = {}
        self._tokenizer = None
        self._packing: tuple[int, bool] | None = None  # (id of the student checked, packs)
        self.pair_layout: dict[str, Any] | None = None
        """The separator and d1 budget when a pairs dir is trained on (recorded in exports)."""
        self.mixture: list[dict[str, Any]] = []
        """Per corpus, its weight, share, tokens and passes when mixed by weight."""

    def setup(self, stage: str | None = None) -> None:
        """Lightning hook: :meth:`load` (a no-op when the CLI already loaded the corpus)."""
        self.load()

    def load(self) -> None:
        """Read, select, tokenize and check the corpus (every rank; idempotent).

        ``selftrain fit`` calls this before the Trainer starts, so a bad corpus is reported
        before any run directory, log or checkpoint is written.
        """
        if self.rows:
            return
        hp = self.hparams
        self._tokenizer = load_tokenizer(hp.tokenizer, revision=hp.get("revision"),
                                         flag=STUDENT_FLAG)
        check_token_id(hp.bos_token_id, len(self._tokenizer), "--data.bos_token_id")
        settings = RowSettings(**{name: hp[name] for name in RowSettings.__dataclass_fields__})
        plan = build_rows(hp.corpus, self._tokenizer, settings, hp.eval_corpus)
        self.rows, self.eval_rows = plan.rows, plan.eval_rows
        self.mixture, self.pair_layout = plan.mixture, plan.pair_layout
        sampler = self._sampler(rank=0, world_size=1)
        tokens = int(sampler.lengths.sum())
        padded_fraction = round(sampler.real_token_fraction(0), 4)
        self.stats = {"rows": len(self.rows), "dropped": plan.dropped,
                      "tokens": tokens, "retokenized": not plan.reused,
                      "batches_per_epoch": len(sampler), "packing": hp.packing,
                      "padded_real_token_fraction": padded_fraction,
                      "real_token_fraction": 1.0 if hp.packing else padded_fraction,
                      **({"mixture": self.mixture} if self.mixture else {}),
                      **({"pair_layout": self.pair_layout} if self.pair_layout else {})}
        layout = ("packed into one row per batch (no padding)" if hp.packing
                  else f"real-token fraction {padded_fraction:.3f}")
        rank_zero_info(
            f"CorpusDataModule: {self.stats['rows']:,} rows, {tokens:,} tokens, "
            f"{'retokenized' if not plan.reused else 'source ids reused'}, "
            f"{self.stats['batches_per_epoch']} batches/epoch at batch {hp.batch_size}, "
            f"{layout}")
        if self.stats["real_token_fraction"] < hp.min_real_token_fraction:
            rank_zero_warn(f"real-token fraction {self.stats['real_token_fraction']:.3f} < "
                           f"{hp.min_real_token_fraction}: raise --data.group_batches (or 0 to "
                           "sort the epoch) to pad less")

    def _sampler(self, rank: int, world_size: int, rows: list[dict[str, Any]] | None = None,
                 shuffle: bool | None = None, position=None) -> LengthGroupedBatchSampler:
        hp = self.hparams
        rows = self.rows if rows is None else rows
        return LengthGroupedBatchSampler(
            [len(row["input_ids"]) for row in rows], batch_size=hp.batch_size,
            seed=hp.seed, shuffle=hp.shuffle if shuffle is None else shuffle,
            group_batches=hp.group_batches, rank=rank, world_size=world_size,
            position=position)

    def _rank_and_world(self) -> tuple[int, int]:
        """This process's rank and the world size; (0, 1) without a trainer."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def _use_packing(self) -> bool:
        """Whether batches are packed: the ``packing`` flag, checked against the student.

        Where the loaded student cannot keep packed documents apart, batches are padded and
        one warning says why. Checked once per model; without a trainer or a loaded model
        the flag is trusted.
        """
        if not self.hparams.packing:
            return False
        module = self.trainer.lightning_module if self.trainer else None
        model = getattr(module, "model", None)
        if model is None:
            return True
        if self._packing is None or self._packing[0] != id(model):
            supported, reason = packing_support(model)
            if not supported:
                fraction = self.stats.get("padded_real_token_fraction", float("nan"))
                self.stats.update(packing=False, real_token_fraction=fraction)
                rank_zero_warn(f"--data.packing true: {reason}; padding each batch instead "
                               f"(real-token fraction {fraction:.3f})")
            self._packing = (id(model), supported)
        return self._packing[1]

    def _collate(self):
        if self._use_packing():
            return pack_collate
        return partial(pad_collate, pad_id=pad_token_id(self._tokenizer),
                       pad_to_multiple_of=self.hparams.pad_to_multiple_of)

    def _position(self) -> tuple[int, int]:
        """(epoch, batches to skip) when a training pass starts; skips once after a resume."""
        epoch = self.trainer.fit_loop.epoch_progress.current.processed if self.trainer else 0
        resume, self._resume = self._resume, None
        skip = resume["batches_done"] if resume and resume["epoch"] == epoch else 0
        return epoch, skip

    def state_dict(self) -> dict[str, int]:
        """Saved in every checkpoint: the epoch being trained and batches finished in it."""
        if self._train_sampler is None or self.trainer is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self._train_sampler.epoch, "batches_done": int(done)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Restore the position; the next pass over that epoch skips what was trained."""
        self._resume = dict(state_dict) if state_dict else None

    def train_dataloader(self) -> DataLoader:
        """The training loader: this rank's share of each epoch's length-grouped plan."""
        rank, world = self._rank_and_world()
        sampler = self._sampler(rank, world, position=self._position)
        if len(sampler) == 0:
            raise SelftrainError(f"--data.corpus {self.hparams.corpus}: {len(self.rows)} rows "
                                 f"give no full step on {world} processes at batch "
                                 f"{self.hparams.batch_size}; lower --data.batch_size")
        self._train_sampler = sampler
        return DataLoader(self.rows, batch_sampler=sampler, collate_fn=self._collate(),
                          num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        """Held-out batches (``--data.eval_corpus``), in a fixed order, split over ranks."""
        if not self.eval_rows:
            return []
        rank, world = self._rank_and_world()
        sampler = self._sampler(rank, world, rows=self.eval_rows, shuffle=False)
        return DataLoader(self.eval_rows, batch_sampler=list(sampler),
                          collate_fn=self._collate())

    def test_dataloader(self) -> DataLoader | list:
        """Same held-out corpus as validation."""
        if not self.eval_rows:
            raise SelftrainError("selftrain test needs --data.eval_corpus (a held-out corpus)")
        return self.val_dataloader()


STUDENT_FLAG = "--model.model"
"""The flag the student's spec (the data's ``tokenizer``) comes from under ``selftrain fit``."""


def _check_arguments(arguments: dict[str, Any]) -> None:
    """Refuse bad ``--data.*`` values in :class:`CorpusDataModule`'s ``__init__``, in one line.

    Everything that needs no file read is checked here, before the Trainer is built.

    Args:
        arguments: the ``__init__`` arguments by name.
    """
    a = arguments
    parse_model_spec(a["tokenizer"], flag=STUDENT_FLAG)
    check_seed(a["seed"], "--data.seed")
    check_token_id(a["bos_token_id"], None, "--data.bos_token_id")
    checks = [
        (a["max_length"] >= 2, "max_length", "must be >= 2 (a BOS and at least one token to "
                                              "predict)"),
        (a["batch_size"] >= 1, "batch_size", "must be >= 1"),
        (a["num_subsets"] is None or a["num_subsets"] >= 1, "num_subsets", "must be >= 1"),
        (a["subset"] is None or (a["subset"] >= 0 and (a["num_subsets"] is None
                                                       or a["subset"] < a["num_subsets"])),
         "subset", "must be in 0..num_subsets-1"),
        (a["group_batches"] >= 0, "group_batches", "must be >= 0 (0 sorts the whole epoch)"),
        (a["pad_to_multiple_of"] >= 1, "pad_to_multiple_of", "must be >= 1 (1 pads to the "
                                                              "longest row)"),
        (a["num_workers"] >= 0, "num_workers", "must be >= 0 (0 loads in the main process)"),
        (0 <= a["min_real_token_fraction"] <= 1, "min_real_token_fraction",
         "must be in [0, 1] (a share of the tokens)"),
    ]
    refuse_first_failed((ok, f"--data.{name} {a[name]}: {rule}") for ok, name, rule in checks)
    corpora = a["corpus"] if isinstance(a["corpus"], list) else [a["corpus"]]
    if not corpora:
        raise SelftrainError("--data.corpus []: give at least one corpus")
    if a["mixture_weights"] is not None:
        check_weights(a["mixture_weights"], len(corpora), "--data.mixture_weights")
    if a["mixture_tokens"] is not None:
        if a["mixture_weights"] is None:
            raise SelftrainError(f"--data.mixture_tokens {a['mixture_tokens']}: a token budget "
                                 "needs --data.mixture_weights (one weight per corpus)")
        if a["mixture_tokens"] < 1:
            raise SelftrainError(f"--data.mixture_tokens {a['mixture_tokens']}: must be >= 1")
    for corpus in corpora:
        if not Path(corpus).exists():
            raise SelftrainError(f"--data.corpus {corpus}: no such file or directory; run "
                                 "`selftrain generate --out DIR` first or fix the path")
    if a["eval_corpus"] is not None and not Path(a["eval_corpus"]).exists():
        raise SelftrainError(f"--data.eval_corpus {a['eval_corpus']}: no such file or directory")
