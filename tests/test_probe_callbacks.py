"""ExtractionProbe and LikelihoodTracker: on a model with planted memories, and in real fits."""

import json
import subprocess
import sys

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import selftrain.callbacks.likelihood_tracker as likelihood_module
import torch
from conftest import CONFIGS, REPO
from selftrain.callbacks.extraction_probe import ExtractionProbe
from selftrain.callbacks.likelihood_tracker import LikelihoodTracker
from test_probes import memorize, random_rows

from selftrain.analysis.tb import read_scalars
from selftrain.corpus import read_corpus
from selftrain.errors import SelftrainError
from selftrain.models import load_model
from selftrain.trainer_cli import SelftrainCLI
from selftrain.training.module import StudentLM

DEBUG = str(CONFIGS / "debug.yaml")
NO_CALLBACKS = "--trainer.callbacks=[]"  # the debug config's own callbacks off: only ours run
EXTRACTION = "selftrain.callbacks.extraction_probe.ExtractionProbe"
LIKELIHOOD = "selftrain.callbacks.likelihood_tracker.LikelihoodTracker"


def write_probes(path, rows, domains):
    pq.write_table(pa.table({"input_ids": [list(map(int, r)) for r in rows],
                             "domain": domains}), path)
    return path


def student(weights=None):
    module = StudentLM(model="tiny:qwen2")
    module.configure_model()
    if weights is not None:
        module.model.load_state_dict(weights.state_dict())
    return module.eval()


def bare_trainer(root):
    """A real Trainer that is not fitting: rank 0 of 1, run dir `root`."""
    return L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=root,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)


@pytest.fixture(scope="module")
def planted_probes(tmp_path_factory):
    """4 memorized rows, 1 memorized prefix with a wrong last token, 4 random rows."""
    planted = random_rows(4, seed=1)
    altered = planted[0].clone()
    altered[-1] = (altered[-1] + 1) % 256
    rows = torch.cat([planted, altered[None], random_rows(4, seed=7)])
    path = write_probes(tmp_path_factory.mktemp("probes") / "probes.parquet", rows,
                        ["planted"] * 5 + ["random"] * 4)
    return path, memorize(planted)


def test_memorized_rows_are_extracted_and_random_rows_are_not(tmp_path, planted_probes):
    path, model = planted_probes
    trainer, module = bare_trainer(tmp_path), student(model)
    probe = ExtractionProbe(probe_set=str(path), batch_size=3)
    probe.check(trainer, module)
    with torch.no_grad():
        metrics = probe.evaluate(trainer, module, epoch=0)
    assert metrics["extraction/planted/memorized"] == 4
    assert metrics["extraction/planted/match_rate"] == pytest.approx((4 * 32 + 31) / (5 * 32))
    assert metrics["extraction/random/memorized"] == 0
    assert metrics["extraction/memorized"] == 4

    rows = pq.read_table(tmp_path / "eval" / "extraction" / "epoch=0-step=0.parquet").to_pydict()
    assert rows["row"] == list(range(9))
    assert rows["domain"] == ["planted"] * 5 + ["random"] * 4
    assert rows["matched_tokens"][:5] == [32, 32, 32, 32, 31]
    assert rows["memorized"] == [True] * 4 + [False] * 5
    random_rate = sum(rows["matched_tokens"][5:]) / (4 * 32)
    assert 0 <= random_rate < 0.5
    assert metrics["extraction/random/match_rate"] == pytest.approx(random_rate)
    assert metrics["extraction/match_rate"] == pytest.approx(sum(rows["matched_tokens"]) / 288)
    assert not [p for p in (tmp_path / "eval" / "extraction").iterdir()
                if p.name.startswith(".")]


def test_likelihood_delta_is_measured_against_the_base_measured_once(tmp_path, planted_probes):
    path, model = planted_probes
    trainer, base, trained = bare_trainer(tmp_path), student(), student(model)
    tracker = LikelihoodTracker(probe_set=str(path), corpus_sample=0, batch_size=4)
    tracker.check(trainer, base)
    with torch.no_grad():
        at_start = tracker.evaluate(trainer, base, epoch=0)
        again = tracker.evaluate(trainer, base, epoch=1)
        later = tracker.evaluate(trainer, trained, epoch=2)
    assert tracker.base_computations == 1
    assert at_start["likelihood/planted/delta_logprob"] == 0.0 == again[
        "likelihood/random/delta_logprob"]
    assert at_start["likelihood/planted/logprob"] < -32 * 3  # a random model: ~ -32 ln 257
    assert later["likelihood/planted/logprob"] > -15  # 4 of 5 continuations memorized
    for domain in ("planted", "random"):
        assert later[f"likelihood/{domain}/delta_logprob"] == pytest.approx(
            later[f"likelihood/{domain}/logprob"] - at_start[f"likelihood/{domain}/logprob"])
    cache = torch.load(tmp_path / "eval" / "likelihood_base.pt", weights_only=True)
    assert cache["student"] == "tiny:qwen2" and cache["fingerprint"] == \
        tracker.probes.fingerprint()
    assert cache["logprobs"].shape == (9,)
    assert tracker.state_dict()["logprobs"].equal(cache["logprobs"])


@pytest.mark.parametrize("cls, kwargs, message", [
    (ExtractionProbe, {"prefix_tokens": 0}, "ExtractionProbe.prefix_tokens 0: must be >= 1"),
    (ExtractionProbe, {"batch_size": -2}, "ExtractionProbe.batch_size -2: must be >= 1"),
    (ExtractionProbe, {"every_n_epochs": 0}, "ExtractionProbe.every_n_epochs 0: must be >= 1"),
    (LikelihoodTracker, {"suffix_tokens": 0}, "LikelihoodTracker.suffix_tokens 0"),
    (LikelihoodTracker, {"corpus_sample": -1}, "LikelihoodTracker.corpus_sample -1"),
    (LikelihoodTracker, {"probe_set": " "}, "LikelihoodTracker.probe_set is empty"),
])
def test_bad_arguments_name_the_argument(cls, kwargs, message):
    with pytest.raises(SelftrainError, match=message.replace(".", r"\.")):
        cls(**{"probe_set": "probes.jsonl", **kwargs})


# --- in real fits ---------------------------------------------------------------------------


def corpus_probes(path, count=6, heldout=5):
    """Probe rows from the debug corpus (trained on) and random rows (held out), 16 + 16."""
    trained = [ids[:32] for ids in read_corpus(CONFIGS / "data" / "tiny_qwen2_self").columns[
        "input_ids"] if len(ids) >= 32][:count]
    return write_probes(path, trained + random_rows(heldout, 32, seed=5).tolist(),
                        ["train"] * count + ["heldout"] * heldout)


def probe_flags(probes, extraction_every=2):
    window = ["--trainer.callbacks.prefix_tokens=16", "--trainer.callbacks.suffix_tokens=16"]
    return [f"--trainer.callbacks+={EXTRACTION}", f"--trainer.callbacks.probe_set={probes}",
            *window, f"--trainer.callbacks.every_n_epochs={extraction_every}",
            f"--trainer.callbacks+={LIKELIHOOD}", f"--trainer.callbacks.probe_set={probes}",
            *window, "--trainer.callbacks.corpus_sample=40"]


def cli(run_dir, *flags):
    return SelftrainCLI(args=["--config", DEBUG, NO_CALLBACKS,
                              "--trainer.default_root_dir", str(run_dir),
                              "--trainer.enable_progress_bar", "false", "--model.export_hf",
                              "never", *flags], run=False)


def fit(run_dir, *flags, ckpt_path=None):
    built = cli(run_dir, *flags)
    built.trainer.fit(built.model, built.datamodule, ckpt_path=ckpt_path)
    return built, {type(c).__name__: c for c in built.trainer.callbacks}


class TrainModeRecorder(L.Callback):
    def __init__(self):
        self.modes = []

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.modes.append(pl_module.training and pl_module.model.training)


def history(run, name):
    return [json.loads(line) for line in (run / "eval" / f"{name}.jsonl").read_text()
            .splitlines()]


def test_probes_in_a_fit_then_resumed_twice(tmp_path, monkeypatch):
    calls = []
    real = likelihood_module.continuation_logprobs
    monkeypatch.setattr(likelihood_module, "continuation_logprobs",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    probes, run = corpus_probes(tmp_path / "probes.parquet"), tmp_path / "run"
    flags = probe_flags(probes)

    built = cli(run, "--trainer.max_epochs", "3", *flags)
    recorder = TrainModeRecorder()
    built.trainer.callbacks.append(recorder)
    built.trainer.fit(built.model, built.datamodule)
    tracker = next(c for c in built.trainer.callbacks if isinstance(c, LikelihoodTracker))
    assert tracker.base_computations == 1 and len(calls) == 4  # epochs 0..3, one call each
    assert len(recorder.modes) == 72 and all(recorder.modes)  # train mode after every eval

    scalars = read_scalars(run / "tb")
    for domain in ("train", "heldout"):
        assert [s for s, _ in scalars[f"extraction/{domain}/memorized"]] == [0, 48, 72]
        assert [s for s, _ in scalars[f"likelihood/{domain}/logprob"]] == [0, 24, 48, 72]
        assert scalars[f"likelihood/{domain}/delta_logprob"][0] == (0, 0.0)
        assert all(0 <= v <= 1 for _, v in scalars[f"extraction/{domain}/match_rate"])
    assert [v for _, v in scalars["eval/epochs_completed"]] == [0, 1, 2, 3]
    nll = [v for _, v in scalars["likelihood/corpus_nll"]]
    assert len(nll) == 4 and nll[-1] < nll[0] < 6  # it trains on that corpus
    train_gain = scalars["likelihood/train/delta_logprob"][-1][1]
    assert train_gain > scalars["likelihood/heldout/delta_logprob"][-1][1]  # seen rows rise more
    assert sorted(p.name for p in (run / "eval" / "extraction").iterdir()) == [
        "epoch=0-step=0.parquet", "epoch=2-step=48.parquet", "epoch=3-step=72.parquet"]
    base_file = run / "eval" / "likelihood_base.pt"
    base = torch.load(base_file, weights_only=True)["logprobs"]
    start = history(run, "likelihood")[0]["metrics"]

    # extended run: the base comes from the run dir, epoch 0 is not evaluated again
    calls.clear()
    _, resumed = fit(run, "--trainer.max_epochs", "4", *flags, ckpt_path="last")
    assert resumed["LikelihoodTracker"].base_computations == 0 and len(calls) == 1
    assert resumed["LikelihoodTracker"].base.equal(base)
    assert [h["epoch"] for h in history(run, "likelihood")] == [0, 1, 2, 3, 4]
    assert [h["epoch"] for h in history(run, "extraction")] == [0, 2, 3, 4]

    # without the cache the base comes from the checkpoint, and the cache is written again
    base_file.unlink()
    _, resumed = fit(run, "--trainer.max_epochs", "5", *flags, ckpt_path="last")
    assert resumed["LikelihoodTracker"].base_computations == 0
    assert torch.load(base_file, weights_only=True)["logprobs"].equal(base)
    last = history(run, "likelihood")[-1]
    assert last["epoch"] == 5
    for domain in ("train", "heldout"):
        assert last["metrics"][f"likelihood/{domain}/delta_logprob"] == pytest.approx(
            last["metrics"][f"likelihood/{domain}/logprob"]
            - start[f"likelihood/{domain}/logprob"], abs=1e-9)

    # other probes (another window): neither the cache nor the checkpoint has their base
    base_file.unlink()
    other = [f.replace("prefix_tokens=16", "prefix_tokens=15") for f in flags]
    with pytest.raises(SelftrainError, match="neither in .*likelihood_base.pt nor in the "
                                             "checkpoint"):
        fit(run, "--trainer.max_epochs", "6", *other, ckpt_path="last")


def test_callbacks_from_a_second_config_file(tmp_path):
    probes = corpus_probes(tmp_path / "probes.parquet")
    extra = tmp_path / "probes.yaml"
    extra.write_text(f"""trainer:
  callbacks:
    - class_path: {EXTRACTION}
      init_args: {{probe_set: {probes}, prefix_tokens: 16, suffix_tokens: 16, save_rows: false}}
    - class_path: {LIKELIHOOD}
      init_args: {{probe_set: {probes}, prefix_tokens: 16, suffix_tokens: 8, corpus_seed: 3}}
""")
    built = cli(tmp_path / "run", "--config", str(extra))
    found = {type(c).__name__: c for c in built.trainer.callbacks}
    assert found["ExtractionProbe"].save_rows is False
    assert found["ExtractionProbe"].prefix_tokens == 16
    assert (found["LikelihoodTracker"].suffix_tokens, found["LikelihoodTracker"].corpus_seed) \
        == (8, 3)


def test_a_bad_probe_set_fails_before_training_with_one_line(tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"input_ids": list(range(n))}) + "\n"
                             for n in (64, 12, 30)))
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "selftrain", "fit", "--config", DEBUG, NO_CALLBACKS,
         "--trainer.default_root_dir", str(run), f"--trainer.callbacks+={EXTRACTION}",
         f"--trainer.callbacks.probe_set={short}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("selftrain: error")]
    assert errors == [f"selftrain: error: ExtractionProbe.probe_set {short}: 2 of 3 rows have "
                      "fewer than 64 tokens (prefix 32 + suffix 32) under the student's "
                      "tokenizer; drop those rows or lower the prefix/suffix lengths"], \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not run.exists()


# --- DDP ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_on_two_processes_gives_the_numbers_of_one(tmp_path):
    probes = corpus_probes(tmp_path / "probes.parquet", count=4, heldout=3)  # 7 rows: uneven
    extra = tmp_path / "probes.yaml"
    extra.write_text(f"""trainer:
  callbacks:
    - class_path: {EXTRACTION}
      init_args: {{probe_set: {probes}, prefix_tokens: 16, suffix_tokens: 16, batch_size: 2}}
    - class_path: {LIKELIHOOD}
      init_args: {{probe_set: {probes}, prefix_tokens: 16, suffix_tokens: 16,
                   corpus_sample: 37, batch_size: 2}}
""")
    run = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "selftrain", "fit", "--config", DEBUG, NO_CALLBACKS,
         "--config", str(extra),
         "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = read_scalars(run / "tb")
    assert [s for s, _ in ddp["likelihood/train/logprob"]] == [0, 12]
    start, end = (v for _, v in ddp["likelihood/train/logprob"])
    assert end > start + 0.1  # training moved the numbers compared below
    for name in ("epoch=0-step=0.parquet", "epoch=1-step=12.parquet"):
        assert pq.read_table(run / "eval" / "extraction" / name)["row"].to_pylist() == list(
            range(7))

    # one process, the same (base) student: the core functions on the whole probe set
    from selftrain.probes.windows import continuation_logprobs, greedy_continuations

    rows = torch.tensor(pq.read_table(probes).to_pydict()["input_ids"])
    base_model = load_model("tiny:qwen2")
    logprobs = continuation_logprobs(base_model, rows, 16)
    matched = (greedy_continuations(base_model, rows[:, :16], 16) == rows[:, 16:]).sum(-1)
    for domain, part in (("train", slice(0, 4)), ("heldout", slice(4, 7))):
        assert ddp[f"likelihood/{domain}/logprob"][0][1] == pytest.approx(
            float(logprobs[part].mean()), abs=1e-4)
        assert ddp[f"extraction/{domain}/match_rate"][0][1] == pytest.approx(
            float(matched[part].double().mean() / 16), abs=1e-6)

    # one process, the DDP-trained student: its epoch-0 numbers are DDP's last ones
    single = tmp_path / "single"
    fit(single, "--config", str(extra), "--model.model", str(run / "hf" / "epoch=1"),
        "--data.same_tokenizer", "true", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "1")
    one = read_scalars(single / "tb")
    tags = [t for t in ddp if t.startswith(("likelihood/", "extraction/"))
            and not t.endswith("delta_logprob")]
    assert len(tags) == 10, tags  # 6 extraction, 2 + 1 logprob, corpus_nll
    for tag in tags:
        assert one[tag][0][1] == pytest.approx(ddp[tag][-1][1], abs=1e-4), tag
    assert ddp["likelihood/train/delta_logprob"][-1][1] == pytest.approx(
        ddp["likelihood/train/logprob"][-1][1] - ddp["likelihood/train/logprob"][0][1],
        abs=1e-4)
