"""`ProbeEvaluation`: what the extraction and likelihood callbacks share.

Both read one probe set with the student's tokenizer before training (so a bad file fails
before any epoch), take the same window arguments, and measure the rows the same way: each
rank measures its shard (rows r, r + W, ...) and a :class:`~selftrain.probes.metrics.RowResults`
gathers every rank's values back into row order, so the numbers do not depend on the world
size. Subclasses say what to measure per row.

Both also need the same teacher-forced forward over each window (prefix + continuation): it
gives log p(x | y) and, from its argmaxes, whether greedy decoding would reproduce the
continuation (:func:`selftrain.probes.windows.teacher_forced`).
:meth:`ProbeEvaluation.teacher_forced` measures it once per evaluation point and keeps it in
this module, keyed by the probe set's fingerprint (ids and window), the Trainer, the student and
the global step it was trained to (its weights change only by an optimizer step, which moves the
step, or by a checkpoint loaded as a fit starts, which forgets what was kept); the other probe
callback of that evaluation, on the same probe set and window, reads it instead of running the
forward again. Each callback still works alone.

A run usually probes one set with both callbacks, so ``selftrain fit`` also takes the run's
probe set once, :class:`SharedProbeSet` (``--probes.probe_set``, ``--probes.prefix_tokens``,
``--probes.suffix_tokens``): a probe callback whose own ``probe_set`` is null reads that one,
with its window (:func:`share_probe_set`, applied to the parsed config).
"""

from __future__ import annotations

import importlib
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from selftrain.callbacks.epoch_eval import EpochEvaluation
from selftrain.errors import SelftrainError
from selftrain.probes.metrics import RowResults
from selftrain.probes.windows import ProbeSet, TeacherForced, load_probe_set, shard_rows
from selftrain.probes.windows import teacher_forced as teacher_forced_rows


@dataclass
class SharedProbeSet:
    """The run's probe set: read by every probe callback that names no ``probe_set`` itself.

    Args:
        probe_set: parquet or jsonl file of probe rows (``text`` or ``input_ids``, ``domain``);
            None: no shared probe set (each probe callback names its own).
        prefix_tokens: tokens of each row used as the prefix.
        suffix_tokens: tokens of the continuation after the prefix.
    """

    probe_set: str | None = None
    prefix_tokens: int = 32
    suffix_tokens: int = 32


_WINDOW = ("prefix_tokens", "suffix_tokens")
"""The window arguments a probe callback takes with the shared probe set."""


def share_probe_set(callbacks: list[Any] | Any | None, shared: Any) -> None:
    """Give every probe callback config without a ``probe_set`` the shared one, window included.

    Args:
        callbacks: the parsed ``trainer.callbacks``, a list or one (``class_path`` +
            ``init_args`` configs; instances and other callbacks are left as they are).
        shared: the parsed :class:`SharedProbeSet` (``probes``).

    Raises:
        SelftrainError: the shared window is empty, or such a callback sets a window of its
            own that differs from the shared one (it would be ignored).
    """
    if shared is None or shared.probe_set is None or callbacks is None:
        return
    for key in _WINDOW:
        if shared[key] < 1:
            raise SelftrainError(f"--probes.{key} {shared[key]}: must be >= 1")
    for config in callbacks if isinstance(callbacks, list) else [callbacks]:
        cls = _config_class(config)
        if not (isinstance(cls, type) and issubclass(cls, ProbeEvaluation)):
            continue
        init_args = config.get("init_args")
        if init_args is None:
            config["init_args"] = init_args = type(config)()
        if init_args.get("probe_set") is not None:
            continue
        defaults = inspect.signature(cls).parameters
        for key in _WINDOW:
            own = init_args.get(key)
            if own is not None and own not in (defaults[key].default, shared[key]):
                raise SelftrainError(f"{cls.__name__}.{key} {own}: this callback reads the run's "
                                     f"probe set (--probes.probe_set), whose window is "
                                     f"--probes.{key} {shared[key]}; set it there, or give the "
                                     "callback its own probe_set")
        init_args["probe_set"] = shared.probe_set
        for key in _WINDOW:
            init_args[key] = shared[key]


def mark_shared(callbacks: list[Any], shared: Any) -> None:
    """Note on each probe callback that reads the run's probe set that it came from ``--probes``.

    Its messages then name the flags the user set (``--probes.probe_set``), not the class's.

    Args:
        callbacks: the Trainer's callbacks, instantiated.
        shared: the parsed :class:`SharedProbeSet` (``probes``), or None.
    """
    if shared is None or shared.probe_set is None:
        return
    for callback in callbacks:
        if (isinstance(callback, ProbeEvaluation)
                and callback.probe_set == str(shared.probe_set)
                and all(getattr(callback, key) == shared[key] for key in _WINDOW)):
            callback.from_probes_flags = True


def _config_class(config: Any) -> type | None:
    """The class a ``class_path`` callback config names (None for anything else)."""
    class_path = config.get("class_path") if hasattr(config, "get") else None
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name, None)


class ProbeEvaluation(EpochEvaluation):
    """Base class: a probe set, its window, and exact sharded per-row measurement.

    Args:
        probe_set: parquet or jsonl file of probe rows (``text`` or ``input_ids``, ``domain``);
            None: the run's (``--probes.probe_set``, filled in by ``selftrain fit``).
        prefix_tokens: tokens of each row used as the prefix.
        suffix_tokens: tokens of the continuation after the prefix.
        batch_size: probe rows per forward pass.
        every_n_epochs: evaluate after every n-th training epoch; the last epoch always is.
        run_at_start: evaluate the base model before the first optimizer step (epoch 0).
    """

    from_probes_flags = False
    """Set by :func:`mark_shared`: the probe set and window came from ``--probes.*``."""

    def __init__(self, probe_set: str | None, prefix_tokens: int, suffix_tokens: int,
                 batch_size: int, every_n_epochs: int, run_at_start: bool) -> None:
        super().__init__(every_n_epochs=every_n_epochs, run_at_start=run_at_start)
        for arg, value in (("prefix_tokens", prefix_tokens), ("suffix_tokens", suffix_tokens),
                           ("batch_size", batch_size)):
            if value < 1:
                raise SelftrainError(f"{self.flag(arg)} {value}: must be >= 1")
        if probe_set is None:
            raise SelftrainError(f"{self.flag('probe_set')}: none given; name a parquet or "
                                 "jsonl file of probe rows here, or the run's in "
                                 "--probes.probe_set")
        if not str(probe_set).strip():
            raise SelftrainError(f"{self.flag('probe_set')} is empty: give a parquet or jsonl "
                                 "file of probe rows")
        self.probe_set = str(probe_set)
        self.prefix_tokens = prefix_tokens
        self.suffix_tokens = suffix_tokens
        self.batch_size = batch_size
        self.probes: ProbeSet | None = None
        self._gathers: dict[str, RowResults] = {}

    def flag(self, name: str) -> str:
        """``--probes.<name>`` where the run's probe set filled it in, else the class's own."""
        if self.from_probes_flags and name in ("probe_set", *_WINDOW):
            return f"--probes.{name}"
        return super().flag(name)

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Load the probe set with the student's tokenizer (bad rows fail before training)."""
        self.probes = load_probe_set(self.probe_set, student_tokenizer(pl_module),
                                     self.prefix_tokens, self.suffix_tokens,
                                     flag=self.flag("probe_set"))

    def measure_rows(self, trainer: L.Trainer, pl_module: L.LightningModule, key: str,
                     measure: Callable[[torch.Tensor], torch.Tensor], width: int = 1,
                     order: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` per-row values of every probe row, gathered over ranks in row order.

        Args:
            trainer: the running Trainer (rank and world size).
            pl_module: the student (its device holds the gather's state).
            key: which measurement (one RowResults each, reused every evaluation).
            measure: row indices of this rank's shard -> one value per row (``[n, width]``
                values when ``width > 1``).
            width: values per row; the result is ``[N, width]`` when it is more than 1.
            order: every row index once, in the order the shards are dealt from (rank r takes
                positions r, r + W, ... of it; by default the rows in order), so costly rows
                put first are spread evenly over the ranks.
        """
        probes = self.probes
        assert probes is not None, "check() loads the probe set before the first evaluation"
        metric = self._gathers.setdefault(key, RowResults(len(probes), width)).to(
            pl_module.device)
        rows = shard_rows(len(probes), trainer.global_rank, trainer.world_size)
        if order is not None:
            rows = order[rows]
        metric.update(rows, measure(rows))  # every rank, even with an empty shard
        values = metric.compute()
        metric.reset()
        return values

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _SHARED.clear()  # a checkpoint may have given the student other weights at a known step
        super().on_fit_start(trainer, pl_module)

    def teacher_forced(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int
                       ) -> TeacherForced:
        """Every probe row's teacher-forced results, measured once per evaluation point.

        The first probe callback to ask at an evaluation point runs the forward (sharded over
        ranks, gathered); one asking later with the same probe set and window, Trainer,
        student and step reads the same tensors. Every rank makes the same choice, so the
        gathers stay in step.

        Args:
            trainer: the Trainer the student is attached to.
            pl_module: the student (in eval mode, grad off, precision context entered).
            step: the global step the student was trained to: which weights these are.
        """
        probes = self.probes
        assert probes is not None, "check() loads the probe set before the first evaluation"
        key = (probes.fingerprint(), step)
        cached = _SHARED.get(trainer, pl_module, key)
        if cached is not None:
            return cached

        def measure(rows: torch.Tensor) -> torch.Tensor:
            result = teacher_forced_rows(pl_module.model, probes.input_ids[rows],
                                         self.prefix_tokens, self.batch_size)
            return torch.stack([result.logprobs, result.extracted.double(),
                                result.close.double()], dim=-1)

        values = self.measure_rows(trainer, pl_module, "teacher_forced", measure, width=3)
        result = TeacherForced(values[:, 0].contiguous(), values[:, 1].round().long(),
                               values[:, 2] > 0.5)
        _SHARED.put(trainer, pl_module, key, result)
        return result


class _LastMeasurement:
    """The teacher-forced results of the latest evaluation point, with what they belong to.

    One entry: a new evaluation point replaces it. The Trainer and the student are held by
    weak reference, so a finished run's are not kept alive (nor mistaken for a new one's).
    """

    def __init__(self) -> None:
        self._owners: tuple[weakref.ref, weakref.ref] | None = None
        self._key: tuple | None = None
        self._value: TeacherForced | None = None

    def _same_owners(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        return (self._owners is not None and self._owners[0]() is trainer
                and self._owners[1]() is pl_module)

    def get(self, trainer: L.Trainer, pl_module: L.LightningModule, key: tuple
            ) -> TeacherForced | None:
        """The stored results if they belong to this Trainer, student and key, else None."""
        if key != self._key or not self._same_owners(trainer, pl_module):
            return None
        return self._value

    def put(self, trainer: L.Trainer, pl_module: L.LightningModule, key: tuple,
            value: TeacherForced) -> None:
        """Keep ``value`` as the latest measurement (replacing the one kept before)."""
        try:
            owners = (weakref.ref(trainer), weakref.ref(pl_module))
        except TypeError:  # an object without weak references: measure every time
            self.clear()
            return
        self._owners, self._key, self._value = owners, key, value

    def clear(self) -> None:
        """Forget the stored measurement."""
        self._owners, self._key, self._value = None, None, None


_SHARED = _LastMeasurement()
"""The per-evaluation cache the probe callbacks share."""


def student_tokenizer(pl_module: L.LightningModule):
    """The student's tokenizer, usable before its weights are loaded."""
    load = getattr(pl_module, "load_tokenizer", None)
    tokenizer = load() if callable(load) else getattr(pl_module, "tokenizer", None)
    if tokenizer is None:
        raise SelftrainError(f"{type(pl_module).__name__} has no tokenizer; the probes need "
                             "the student's tokenizer (use selftrain's StudentLM)")
    return tokenizer
