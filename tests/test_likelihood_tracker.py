"""selftrain.callbacks.likelihood_tracker: LikelihoodTracker's deltas against the base model.

The base is measured once: on a model with planted memories, and in a real fit resumed twice
(the base read back from the run dir's cache, then from the checkpoint); in that fit the
extraction probe and the tracker share one teacher-forced pass per evaluation.
"""

import pytest
import torch
from helpers import (
    bare_trainer,
    callback,
    corpus_probes,
    fit_cli,
    history,
    make_student,
    probe_flags,
    train_modes,
)

import selftrain.callbacks.probe_eval as probe_eval_module
from selftrain.analysis.tb import read_scalars
from selftrain.callbacks.likelihood_tracker import LikelihoodTracker
from selftrain.errors import SelftrainError


def test_likelihood_delta_is_measured_against_the_base_measured_once(tmp_path, planted_probes):
    path, model = planted_probes
    trainer, base, trained = (bare_trainer(tmp_path), make_student().eval(),
                              make_student(model).eval())
    tracker = LikelihoodTracker(probe_set=str(path), corpus_sample=0, batch_size=4)
    tracker.check(trainer, base)
    with torch.no_grad():
        at_start = tracker.evaluate(trainer, base, epoch=0, step=0)
        again = tracker.evaluate(trainer, base, epoch=1, step=0)
        later = tracker.evaluate(trainer, trained, epoch=2, step=0)
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


def test_probes_in_a_fit_then_resumed_twice(tmp_path, monkeypatch):
    calls = []  # rows of each teacher-forced pass, whichever probe callback runs it
    real = probe_eval_module.teacher_forced_rows
    monkeypatch.setattr(probe_eval_module, "teacher_forced_rows",
                        lambda model, ids, *a, **k: calls.append(len(ids)) or real(model, ids,
                                                                                    *a, **k))
    probes, run = corpus_probes(tmp_path / "probes.parquet"), tmp_path / "run"
    flags = probe_flags(probes)

    recorder = train_modes()
    built = fit_cli(run, "--trainer.max_epochs", "3", *flags, extra_callbacks=[recorder],
                    callbacks=False, export=False)
    tracker = callback(built, LikelihoodTracker)
    # epochs 0..3: one pass over the 11 rows each, though both callbacks ran at 0, 2 and 3
    assert tracker.base_computations == 1 and calls == [11] * 4
    assert len(recorder.modes) == 72 and set(recorder.modes) == {(True, True)}  # train mode

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
    resumed = callback(fit_cli(run, "--trainer.max_epochs", "4", *flags, ckpt_path="last",
                               callbacks=False, export=False), LikelihoodTracker)
    assert resumed.base_computations == 0 and calls == [11]  # epoch 4: both, one pass
    assert resumed.base.equal(base)
    assert [h["epoch"] for h in history(run, "likelihood")] == [0, 1, 2, 3, 4]
    assert [h["epoch"] for h in history(run, "extraction")] == [0, 2, 3, 4]

    # without the cache the base comes from the checkpoint, and the cache is written again
    base_file.unlink()
    resumed = callback(fit_cli(run, "--trainer.max_epochs", "5", *flags, ckpt_path="last",
                               callbacks=False, export=False), LikelihoodTracker)
    assert resumed.base_computations == 0
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
        fit_cli(run, "--trainer.max_epochs", "6", *other, ckpt_path="last", callbacks=False,
                export=False)
