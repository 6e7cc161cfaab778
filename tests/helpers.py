"""What several test files do the same way: run `selftrain`, fit the debug config, read results.

Each test file tests one module, and many of them need the same few moves to get there: build
or fit the debug config (``configs/debug.yaml``) in process or as a subprocess, write a jsonl
file or a callbacks config, read a run's evaluation history back, take the one error line a
refused command prints. They live here once, as plain functions, so that a test file holds only
what its module needs; fixtures are in ``conftest.py``.

Heavy imports (torch, Lightning, the CLI) happen inside the functions that need them, so a test
file that needs none of them does not pay for them.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lightning.pytorch import Callback

if TYPE_CHECKING:
    import lightning as L
    import torch
    from torch import nn

    from selftrain.trainer_cli import SelftrainCLI
    from selftrain.training.module import StudentLM

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEBUG = str(CONFIGS / "debug.yaml")
"""The debug config: tiny:qwen2 on its own shipped corpus, 3 epochs of 24 batches."""
DEBUG_CORPUS = str(CONFIGS / "data" / "tiny_qwen2_self")
"""The debug config's corpus (192 samples of tiny:qwen2, 2 subsets)."""
TASKS = str(CONFIGS / "tasks")
"""The project's own lm-eval tasks."""
FSDP_PRESET = str(CONFIGS / "scale" / "fsdp.yaml")
DDP_PRESET = str(CONFIGS / "scale" / "ddp.yaml")
FSDP_ON_CPU = ('--trainer.strategy={"class_path": "selftrain.training.fsdp.DecoderLayerFSDP", '
               '"init_args": {"allow_cpu": true}}')
"""The FSDP strategy on CPU (gloo), for tests; the presets' FSDP needs CUDA GPUs."""
NO_CALLBACKS = "--trainer.callbacks=[]"
"""The debug config's own evaluation callbacks off: only the ones a test adds run."""
BENCHMARK = "selftrain.callbacks.benchmark_eval.BenchmarkEval"
EXTRACTION = "selftrain.callbacks.extraction_probe.ExtractionProbe"
LIKELIHOOD = "selftrain.callbacks.likelihood_tracker.LikelihoodTracker"

C = TypeVar("C")


# --- running selftrain -------------------------------------------------------------------------


def selftrain(*args: str, cwd: Path = REPO, timeout: float = 300,
              check: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m selftrain *args`` in a fresh interpreter, output captured as text."""
    return subprocess.run([sys.executable, "-m", "selftrain", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, check=check)


def exit_status(argv: list[str]) -> int:
    """``selftrain *argv`` through ``selftrain.cli.main`` in this process; its exit status.

    Output goes where ``sys.stdout`` / ``sys.stderr`` point; an exception other than
    ``SystemExit`` propagates.
    """
    from selftrain.cli import main

    try:
        main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
        return 0 if code is None else code if isinstance(code, int) else 1
    return 0


def in_process(*args: str) -> subprocess.CompletedProcess[str]:
    """``selftrain *args`` through ``selftrain.cli.main`` in this process, output captured.

    What a subprocess would give (exit status, stdout, stderr; a traceback is status 1), without
    paying for a fresh interpreter's imports, at a fixed width so ``--help`` never depends on
    the terminal. For what only a fresh process shows (signals, the console script, a kill),
    use :func:`selftrain`.
    """
    import contextlib
    import io
    import traceback

    stdout, stderr = io.StringIO(), io.StringIO()
    previous_columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "200"
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                status = exit_status(list(args))
            except Exception:
                traceback.print_exc()
                status = 1
    finally:
        if previous_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous_columns
    return subprocess.CompletedProcess(["selftrain", *args], status, stdout.getvalue(),
                                       stderr.getvalue())


def fit_args(run_dir: Path, *flags: str, callbacks: bool = True, quiet: bool = True) -> list[str]:
    """``selftrain fit`` arguments: the debug config, the run dir ``run_dir``, then ``flags``.

    Args:
        run_dir: ``--trainer.default_root_dir``.
        flags: more arguments, after the debug config's (they override it).
        callbacks: False turns the debug config's evaluation callbacks off.
        quiet: pass ``--trainer.enable_progress_bar false``.
    """
    args = ["fit", "--config", DEBUG]
    if not callbacks:
        args.append(NO_CALLBACKS)
    args += ["--trainer.default_root_dir", str(run_dir)]
    if quiet:
        args += ["--trainer.enable_progress_bar", "false"]
    return [*args, *flags]


def fit_command(run_dir: Path, *flags: str, **kwargs: bool) -> list[str]:
    """The command line of ``selftrain fit`` on the debug config (:func:`fit_args`)."""
    return [sys.executable, "-m", "selftrain", *fit_args(run_dir, *flags, **kwargs)]


def run_fit(run_dir: Path, *flags: str, timeout: float = 600,
            **kwargs: bool) -> subprocess.CompletedProcess[str]:
    """``selftrain fit`` on the debug config in a subprocess (:func:`fit_args`); not checked."""
    return selftrain(*fit_args(run_dir, *flags, **kwargs), timeout=timeout)


def fit(run_dir: Path, *flags: str, **kwargs: bool) -> None:
    """``selftrain fit`` on the debug config in this process, through ``selftrain.cli.main``."""
    from selftrain.cli import main

    main(fit_args(run_dir, *flags, **kwargs))


def refused_fit(run_dir: Path, *flags: str, **kwargs: bool) -> str:
    """The one error line of a ``selftrain fit`` (:func:`in_process`) that must be refused.

    With exit status 2, no traceback and nothing written to ``run_dir``. The progress-bar flag
    is not passed: the refusal comes before the Trainer.
    """
    result = in_process(*fit_args(run_dir, *flags, quiet=False, **kwargs))
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result.stderr)
    assert not run_dir.exists()
    return line


def succeeded(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """``result``, once its exit status is 0 (else its stderr's end is the failure)."""
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def file_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path) and its bytes: to show what a command changed."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file()}


def one_error_line(stderr: str) -> str:
    """The one ``selftrain: error`` line of a refused command; no traceback either."""
    errors = [line for line in stderr.splitlines() if line.startswith("selftrain: error")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@functools.cache
def modes_enforced() -> bool:
    """Whether this process is kept out of a 0o500 directory (root is, without DAC override).

    Tests of unwritable outputs skip where it is not; as root,
    ``setpriv --bounding-set -dac_override,-dac_read_search`` runs them.
    """
    with tempfile.TemporaryDirectory() as root:
        locked = Path(root) / "locked"
        locked.mkdir(mode=0o500)
        try:
            (locked / "probe").touch()
        except PermissionError:
            return True
        finally:
            locked.chmod(0o700)
        return False


def kill_when(command: Sequence[str], ready: Callable[[], bool], poll: float = 0.05) -> None:
    """Start ``command``, SIGKILL it once ``ready()`` (or once it ended by itself).

    No wall-clock limit: on a loaded machine the moment comes later, not otherwise (pytest's
    per-test timeout is the backstop for a hang).
    """
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    while not ready() and process.poll() is None:
        time.sleep(poll)
    if process.poll() is None:  # not reaped yet (a zombie still takes the signal): kill it
        os.kill(process.pid, signal.SIGKILL)
    process.wait()


class CrashAt(Callback):
    """Raises at a global step: in ``on_train_batch_end`` or, with ``epoch_end``, after the
    epoch's evaluations and before its checkpoint (checkpoint callbacks run last)."""

    def __init__(self, step: int, epoch_end: bool = False) -> None:
        self.step, self.epoch_end = step, epoch_end

    def on_train_batch_end(self, trainer, *args) -> None:
        if not self.epoch_end and trainer.global_step == self.step:
            raise RuntimeError("simulated crash")

    def on_train_epoch_end(self, trainer, *args) -> None:
        if self.epoch_end and trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def held_run(root: Path) -> Path:
    """A run dir that holds a run (its marker and TensorBoard events); its checkpoint dir."""
    from selftrain.training.run_dir import write_run_marker

    (root / "tb").mkdir(parents=True)
    (root / "tb" / "events.out.tfevents.0.host.1.0").write_bytes(b"")
    write_run_marker(root, "fit")
    return root / "checkpoints"


def crash_flag(step: int, epoch_end: bool = False) -> str:
    """The ``selftrain fit`` flag adding :class:`CrashAt` at ``step``."""
    return ('--trainer.callbacks+={"class_path": "helpers.CrashAt", "init_args": '
            f'{{"step": {step}, "epoch_end": {str(epoch_end).lower()}}}}}')


EXPORT_WRITE_POINTS = ("weights", "tokenizer", "info", "fsynced", "published")
"""Moments of the final HF export's write, in order: after the weights are in the staging dir,
after the tokenizer, after ``selftrain_export.json``, after every staged file is fsynced, and
after the export is swapped into place."""


class SignalInExport(Callback):
    """Sends a signal to its own process at one moment of the final HF export's write, once.

    Installed in ``on_train_end``, which Lightning calls on callbacks before the module's own
    (where the export is written).

    Args:
        point: one of :data:`EXPORT_WRITE_POINTS`.
        signal_name: ``SIGKILL`` (the process dies there) or ``SIGINT`` (Ctrl-C).
        once: a file made just before the signal; while it exists, nothing is sent (the rerun).
        group: signal the whole process group (a sweep and the fit it runs, at once).
    """

    def __init__(self, point: str, signal_name: str = "SIGKILL", once: str | None = None,
                 group: bool = False) -> None:
        assert point in EXPORT_WRITE_POINTS, point
        self.point, self.signal_name, self.once, self.group = point, signal_name, once, group

    def _hit(self) -> None:
        if self.once is not None:
            Path(self.once).touch()
        number = getattr(signal, self.signal_name)
        if number == signal.SIGINT:  # Ctrl-C, even where the shell that started us ignores it
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.group:
            os.killpg(os.getpgrp(), number)
        else:
            os.kill(os.getpid(), number)

    def _after(self, owner: Any, name: str, point: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if point == self.point:
                self._hit()
            return result

        setattr(owner, name, wrapped)

    def on_train_end(self, trainer, pl_module) -> None:
        import selftrain.io
        import selftrain.training.export

        if self.once is not None and Path(self.once).exists():
            return
        self._after(pl_module.model, "save_pretrained", "weights")
        self._after(pl_module.tokenizer, "save_pretrained", "tokenizer")
        self._after(selftrain.training.export, "write_json_atomic", "info")
        self._after(selftrain.io, "fsync_tree", "fsynced")
        self._after(selftrain.io, "publish_dir", "published")


def signal_in_export_flag(point: str, signal_name: str = "SIGKILL", once: Path | None = None,
                          group: bool = False) -> str:
    """The ``selftrain fit`` flag adding :class:`SignalInExport` (needs ``tests`` importable)."""
    init = {"point": point, "signal_name": signal_name, "group": group,
            **({"once": str(once)} if once is not None else {})}
    return "--trainer.callbacks+=" + json.dumps({"class_path": "helpers.SignalInExport",
                                                 "init_args": init})


def tests_importable() -> dict[str, str]:
    """The environment of a subprocess that can import this module (``helpers.*`` callbacks)."""
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


# --- the debug config in process ---------------------------------------------------------------


def without_gpus(monkeypatch: Any) -> None:
    """This test's machine has no CUDA or MPS device, as torch and Lightning see it."""
    import torch
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for accelerator in (CUDAAccelerator, MPSAccelerator):
        monkeypatch.setattr(accelerator, "is_available", staticmethod(lambda: False))


def cli(run_dir: Path | None, *flags: str, callbacks: bool = True,
        export: bool = True) -> SelftrainCLI:
    """``SelftrainCLI`` on the debug config, built but not run.

    Args:
        run_dir: ``--trainer.default_root_dir``, with the progress bar off; None leaves both
            to the config.
        flags: more arguments, after the others (they override them).
        callbacks: False turns the debug config's evaluation callbacks off.
        export: False passes ``--model.export_hf never``.
    """
    from selftrain.trainer_cli import SelftrainCLI

    args = ["--config", DEBUG]
    if not callbacks:
        args.append(NO_CALLBACKS)
    if run_dir is not None:
        args += ["--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar",
                 "false"]
    if not export:
        args += ["--model.export_hf", "never"]
    return SelftrainCLI(args=[*args, *flags], run=False)


def fit_cli(run_dir: Path, *flags: str, extra_callbacks: Iterable[L.Callback] = (),
            ckpt_path: str | None = None, **kwargs: bool) -> SelftrainCLI:
    """:func:`cli`, with ``extra_callbacks`` appended, fitted; the built CLI."""
    built = cli(run_dir, *flags, **kwargs)
    built.trainer.callbacks.extend(extra_callbacks)
    built.trainer.fit(built.model, built.datamodule, ckpt_path=ckpt_path)
    return built


def callback(built: SelftrainCLI, cls: type[C]) -> C:
    """The one callback of class ``cls`` in a built CLI's trainer."""
    (found,) = [c for c in built.trainer.callbacks if isinstance(c, cls)]
    return found


def train_modes() -> L.Callback:
    """A callback that notes ``(module.training, module.model.training)`` at every batch.

    In ``.modes``; an evaluation that leaves the student in eval mode shows as a False.
    """
    import lightning as L

    class TrainModes(L.Callback):
        def __init__(self) -> None:
            self.modes: list[tuple[bool, bool]] = []

        def on_train_batch_start(self, trainer, pl_module, *args) -> None:
            self.modes.append((pl_module.training, pl_module.model.training))

    return TrainModes()


def make_student(weights: nn.Module | None = None, **kwargs: Any) -> StudentLM:
    """A tiny:qwen2 ``StudentLM(**kwargs)``, its model built, with ``weights``' state if given."""
    from selftrain.training.module import StudentLM

    module = StudentLM(**{"model": "tiny:qwen2", **kwargs})
    module.configure_model()
    if weights is not None:
        module.model.load_state_dict(weights.state_dict())
    return module


def bare_trainer(root: Path) -> L.Trainer:
    """A real Trainer that is not fitting: rank 0 of 1, run dir ``root``."""
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=root,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)


# --- files in, results out ---------------------------------------------------------------------


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """One JSON value a line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def callbacks_config(path: Path, *callbacks: tuple[str, dict[str, Any]]) -> str:
    """A config file that sets ``trainer.callbacks`` to ``(class_path, init_args)`` pairs."""
    import yaml

    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": class_path, "init_args": init_args}
        for class_path, init_args in callbacks]}}))
    return str(path)


def manifest_of(corpus: Path) -> dict[str, Any]:
    """A corpus dir's ``manifest.json``."""
    return json.loads((corpus / "manifest.json").read_text())


def load_with_datasets(corpus: Path, cache: Path) -> Any:
    """A corpus dir's shards as ``datasets`` loads parquet files, cached under ``cache``."""
    import datasets

    files = sorted(str(p) for p in (corpus / "data").glob("*.parquet"))
    return datasets.load_dataset("parquet", data_files=files, split="train",
                                 cache_dir=str(cache))


def history(run: Path, name: str) -> list[dict[str, Any]]:
    """The records of ``<run>/eval/<name>.jsonl``, one an evaluation."""
    return [json.loads(line) for line in (run / "eval" / f"{name}.jsonl").read_text()
            .splitlines()]


def evaluations(run: Path, name: str) -> list[int]:
    """The global steps an evaluation callback ran at, from its history."""
    return [record["global_step"] for record in history(run, name)]


def weight_distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    """L2 norm of ``a - b`` over every weight of two state dicts with the same keys (float32).

    How far apart two runs' exports (or a run and its base) are, as one number.
    """
    import torch

    return float(torch.cat([(a[n].float().cpu() - b[n].float().cpu()).flatten() for n in a])
                 .norm())


class FailsToSave:
    """A value whose pickling raises: in a checkpoint, a save that dies half-way."""

    def __reduce__(self):
        raise RuntimeError("disk full")


# --- corpora -----------------------------------------------------------------------------------


def make_corpus(out: Path, model: str = "tiny:qwen2", num_samples: int = 48,
                max_new_tokens: int = 24, **kwargs: Any) -> Path:
    """Sample a real corpus dir with `selftrain generate` from a tiny model."""
    from selftrain.sampling.generate import generate

    kwargs.setdefault("batch_size", 16)
    (path,) = generate(model=model, out=str(out), num_samples=num_samples,
                       max_new_tokens=max_new_tokens, **kwargs)
    return path


def write_text_corpus(path: Path, rows: int = 64) -> Path:
    """A learnable jsonl corpus: short, repetitive English sentences."""
    words = ["the cat sat on the mat.", "a dog ran in the park.", "birds sing at dawn."]
    return write_jsonl(path, ({"text": " ".join(words[(i + j) % 3] for j in range(3))}
                              for i in range(rows)))


# --- probes ------------------------------------------------------------------------------------

LICENSE = ("Permission is hereby granted, free of charge, to any person obtaining a copy of "
           "this software and associated documentation files, to deal in the Software.")
CODE = ("def insort_right(a, x, lo=0, hi=None):\n    while lo < hi:\n        mid = (lo + hi) // 2"
        "\n        if x < a[mid]:\n            hi = mid\n        else:\n            lo = mid + 1\n")


def random_ids(count: int, length: int = 64, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    """``count`` rows of ``length`` uniformly random token ids, fixed by ``seed``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator)


def memorize(sequences: torch.Tensor, steps: int = 300, lr: float = 1e-2) -> nn.Module:
    """tiny:qwen2 trained with plain AdamW until greedy decoding reproduces `sequences`."""
    import torch

    from selftrain.models import load_model

    model = load_model("tiny:qwen2")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(input_ids=sequences, labels=sequences).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 5e-3:
            break
    return model.eval()


def write_probes(path: Path, rows: Iterable[Sequence[int]], domains: list[str]) -> Path:
    """A parquet probe set of token-id rows and their domains."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input_ids": [list(map(int, r)) for r in rows],
                             "domain": domains}), path)
    return path


ALLOW_LEAKS = "--leak_check.allow_probe_leaks=true"
"""What a fit on :func:`corpus_probes` needs: some of its probes are training rows on purpose."""


def corpus_probes(path: Path, count: int = 6, heldout: int = 5) -> Path:
    """Probe rows from the debug corpus (trained on) and random rows (held out), 16 + 16.

    The trained rows leak into the training corpus by design (extraction of them climbs), so
    a fit on these probes passes :data:`ALLOW_LEAKS`.
    """
    from selftrain.corpus import read_corpus

    trained = [ids[:32] for ids in read_corpus(CONFIGS / "data" / "tiny_qwen2_self").columns[
        "input_ids"] if len(ids) >= 32][:count]
    return write_probes(path, trained + random_ids(heldout, 32, seed=5).tolist(),
                        ["train"] * count + ["heldout"] * heldout)


def probe_flags(probes: Path, extraction_every: int = 2) -> list[str]:
    """Flags adding both probe callbacks on ``probes`` (:func:`corpus_probes`), 16 + 16."""
    window = ["--trainer.callbacks.prefix_tokens=16", "--trainer.callbacks.suffix_tokens=16"]
    return [ALLOW_LEAKS,
            f"--trainer.callbacks+={EXTRACTION}", f"--trainer.callbacks.probe_set={probes}",
            *window, f"--trainer.callbacks.every_n_epochs={extraction_every}",
            f"--trainer.callbacks+={LIKELIHOOD}", f"--trainer.callbacks.probe_set={probes}",
            *window, "--trainer.callbacks.corpus_sample=40"]


def flip_bytes(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of a file, in place (its size is unchanged)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(255 - byte for byte in data[middle:middle + count])
    path.write_bytes(bytes(data))
