"""SBP: nearest-neighbour pairs, the synthesizer's ``d1 SEP d2`` rows, and synthesis.

Pairs are found with the real bundled all-MiniLM-L6-v2 on a corpus written with known
neighbours; the synthesizer is a tiny Qwen2 saved as an export with a pair layout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import fit, kill_when, manifest_of, selftrain, succeeded, write_jsonl

from selftrain.corpus import read_corpus
from selftrain.synthesis.layout import DEFAULT_SEPARATOR, d1_budget, pair_row, separator_ids
from selftrain.synthesis.neighbours import exact_neighbours, faiss_neighbours, overlap

TOPICS = [
    ("The cat slept on the warm mat by the kitchen fire all afternoon.",
     "A small kitten was dozing on a rug near the fireplace in the kitchen."),
    ("Stock markets fell sharply today as investors worried about interest rates.",
     "Shares dropped across global exchanges amid fears of rising interest rates."),
    ("To bake bread, mix flour, water, yeast and salt, then knead the dough.",
     "Bread dough is made by kneading flour with water, salt and yeast before baking."),
    ("The goalkeeper saved a penalty in the final minute to win the cup for his team.",
     "A last-minute penalty save by the keeper handed the club the championship trophy."),
    ("Volcanic eruptions release ash and sulfur dioxide high into the atmosphere.",
     "When a volcano erupts it throws ash and sulphur gases into the upper atmosphere."),
]
"""Five topics, two paraphrases each: each document's nearest neighbour is its partner."""


def known_neighbours(path: Path) -> Path:
    """The topic documents (ids 0..9, partner of 2t is 2t+1) plus an exact copy of id 0."""
    rows = [{"id": 2 * t + j, "text": text} for t, pair in enumerate(TOPICS)
            for j, text in enumerate(pair)]
    rows.append({"id": 100, "text": TOPICS[0][0]})
    return write_jsonl(path, rows)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    from selftrain.synthesis.pairs import pairs

    root = tmp_path_factory.mktemp("pairs")
    return pairs(str(known_neighbours(root / "docs.jsonl")), str(root / "pairs"),
                 threshold=0.3, top_k=1, device="cpu")


def test_exact_neighbours_equal_a_full_sort_of_every_similarity():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(53, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    scores, indices = exact_neighbours(vectors, k=5, block=7)
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    assert (indices == expected).all()
    np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, 1), rtol=1e-5)
    assert exact_neighbours(vectors[:3], k=10)[1].shape == (3, 2)  # at most N - 1


def test_faiss_index_finds_the_exact_neighbours_of_a_small_corpus():
    pytest.importorskip("faiss", reason="the ann extra (faiss-cpu) is not installed")
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact = exact_neighbours(vectors, k=3)[1]
    approximate = faiss_neighbours(vectors, k=3)[1]
    assert (approximate != np.arange(300)[:, None]).all()
    recall = np.mean([len(set(a) & set(e)) / 3 for a, e in zip(approximate, exact, strict=True)])
    assert recall > 0.95


def test_overlap_is_one_for_a_copy_or_containment_and_low_for_other_text():
    text = "one two three four five six seven eight nine ten"
    assert overlap(text, text.upper(), 5) == 1.0
    assert overlap(text, f"prefix words here {text} and more", 5) == 1.0
    assert overlap(text, "alpha beta gamma delta epsilon zeta eta theta", 5) == 0.0
    assert overlap("short", "Short", 5) == 1.0 and overlap("short", "other", 5) == 0.0


def test_pairs_are_the_known_neighbours_and_the_copy_is_dropped(pairs_dir):
    import pandas as pd

    table = pd.read_parquet(pairs_dir / "data" / "pairs.parquet")
    by_d1 = dict(zip(table.d1_id, table.d2_id, strict=True))
    for t in range(1, len(TOPICS)):  # topic 0 has the copy: its top-1 is the copy itself
        assert by_d1[2 * t] == 2 * t + 1 and by_d1[2 * t + 1] == 2 * t
    pairs = {frozenset(pair) for pair in zip(table.d1_id, table.d2_id, strict=True)}
    assert frozenset({0, 100}) not in pairs  # 0 and 100 are the same text: a near-copy
    assert by_d1[1] in (0, 100)  # either copy is 1's paraphrase (an exact tie)
    assert (table.similarity >= 0.3).all() and (table.d1_id != table.d2_id).all()
    manifest = manifest_of(pairs_dir)
    assert manifest["kind"] == "pairs" and manifest["documents"] == 11
    assert manifest["counts"]["near_copies"] >= 2  # 0 -> 100 and 100 -> 0
    assert manifest["counts"]["pairs"] == len(table)


def test_pairs_of_one_subset_stay_inside_it(tmp_path):
    from selftrain.synthesis.pairs import pairs

    docs = known_neighbours(tmp_path / "docs.jsonl")
    out = pairs(str(docs), str(tmp_path / "pairs"), threshold=-1.0, top_k=3, subset=1,
                num_subsets=2, device="cpu")
    import pandas as pd

    table = pd.read_parquet(out / "data" / "pairs.parquet")
    rows = [json.loads(line)["id"] for line in docs.read_text().splitlines()]
    odd = {rows[i] for i in range(1, len(rows), 2)}  # subset 1 of 2: rows 1, 3, 5, ...
    assert set(table.d1_id) | set(table.d2_id) <= odd and len(table) > 0
    assert manifest_of(out)["documents"] == len(odd)


def tiny_tokenizer():
    from selftrain.models import load_tokenizer

    return load_tokenizer("tiny:qwen2")


def test_a_pair_row_trains_on_d2_and_its_eos_only():
    from selftrain.training.batching import pad_collate
    from selftrain.training.packing import pack_collate

    tokenizer = tiny_tokenizer()
    sep = separator_ids(tokenizer, DEFAULT_SEPARATOR, "--data.pair_separator")
    d1 = tokenizer("the first document, long enough to be cut", add_special_tokens=False)
    d2 = tokenizer("the second one", add_special_tokens=False)
    row = pair_row(d1["input_ids"], d2["input_ids"], sep, 1, 2, max_length=64)
    budget = d1_budget(64, len(sep))
    assert row["loss_from"] == 1 + min(budget, len(d1["input_ids"])) + len(sep)
    assert row["input_ids"][row["loss_from"]:] == [*d2["input_ids"], 2]
    plain = {"input_ids": [5, 6, 7]}  # a document row beside it keeps its own labels
    padded = pad_collate([row, plain], pad_id=0)["labels"]
    packed = pack_collate([row, plain])["labels"]
    d2_and_eos = [*d2["input_ids"], 2]
    assert [int(t) for t in padded.flatten() if t != -100] == [*d2_and_eos, 5, 6, 7]
    assert [int(t) for t in packed.flatten() if t != -100] == [*d2_and_eos, 6, 7]


def test_the_data_module_lays_out_pairs_with_the_loss_on_d2(pairs_dir):
    import pandas as pd

    from selftrain.training.batching import pad_collate
    from selftrain.training.data import CorpusDataModule

    data = CorpusDataModule(str(pairs_dir), tokenizer="tiny:qwen2", max_length=256,
                            batch_size=4)
    data.load()
    tokenizer = tiny_tokenizer()
    table = pd.read_parquet(pairs_dir / "data" / "pairs.parquet")
    assert len(data.rows) == len(table)
    batch = pad_collate(data.rows, pad_id=0)
    for row, labels, d1, d2 in zip(data.rows, batch["labels"], table.d1_text, table.d2_text,
                                   strict=True):
        trained = [int(t) for t in labels if t != -100]
        assert tokenizer.decode(trained, skip_special_tokens=True) == d2
        prompt = tokenizer.decode(row["input_ids"][:row["loss_from"]], skip_special_tokens=True)
        assert prompt == d1 + DEFAULT_SEPARATOR
    assert data.pair_layout["separator"] == DEFAULT_SEPARATOR
    assert data.stats["pair_layout"]["max_d1_tokens"] == d1_budget(256, len(
        data.pair_layout["separator_ids"]))


def test_a_synthesizer_fit_on_pairs_exports_its_layout_and_synthesize_reads_it(
        tmp_path, pairs_dir):
    from selftrain.models import EXPORT_INFO
    from selftrain.synthesis.synthesize import synthesize

    run = tmp_path / "synthesizer"
    fit(run, "--data.corpus", str(pairs_dir), "--data.pair_separator", "\n<next>\n",
        "--data.max_length", "96", "--trainer.max_epochs", "1", "--model.export_hf", "last",
        callbacks=False)
    export = run / "hf" / "epoch=1"
    layout = json.loads((export / EXPORT_INFO).read_text())["pair_layout"]
    assert layout["separator"] == "\n<next>\n" and layout["max_length"] == 96
    out = synthesize(str(export), seeds=str(known_neighbours(tmp_path / "seeds.jsonl")),
                     out=str(tmp_path / "sbp"), num_samples=3, max_new_tokens=5, device="cpu")
    manifest = manifest_of(out)
    assert manifest["pair_layout"] == {"separator": "\n<next>\n",
                                       "max_d1_tokens": layout["max_d1_tokens"]}
    assert manifest["source"]["model"] == str(export)


def test_synthesis_prompts_are_the_training_rows_up_to_d2(pairs_dir):
    """SeedPrompts builds, for a seed d1, exactly the tokens a training row puts before d2."""
    from selftrain.synthesis.synthesize import SeedPrompts
    from selftrain.training.data import CorpusDataModule

    data = CorpusDataModule(str(pairs_dir), tokenizer="tiny:qwen2", max_length=200,
                            batch_size=4)
    data.load()
    layout = data.pair_layout
    import pandas as pd

    table = pd.read_parquet(pairs_dir / "data" / "pairs.parquet")
    assert len(data.rows) == len(table) and layout["pairs_dropped"] == 0
    for row, d1 in zip(data.rows, table.d1_text, strict=True):
        seeding = SeedPrompts(0, [7], [d1], layout["separator_ids"], layout["bos_token_id"],
                              layout["max_d1_tokens"])
        (prompt,), seeds = seeding.prompts([0], tiny_tokenizer(), max_new_tokens=5)
        assert prompt.tokens == row["input_ids"][:row["loss_from"]] and seeds == {0: 7}


def test_a_pair_row_keeps_d2_whole_and_shortens_d1_first_or_drops_the_pair():
    # a d2 cut anywhere but its end would teach the synthesizer that documents never end
    sep, bos, eos = [9, 9], 1, 2
    budget = d1_budget(40, len(sep))  # 18: half of what BOS and SEP leave
    d1 = list(range(100, 130))
    whole = pair_row(d1, [5] * 10, sep, bos, eos, max_length=40)
    assert whole["input_ids"] == [bos, *d1[:budget], *sep, *[5] * 10, eos]
    # d2 of 20 tokens: d1 gives up 2 of its 18 tokens for d2 to end inside the row
    shortened = pair_row(d1, [5] * 20, sep, bos, eos, max_length=40)
    assert shortened["input_ids"] == [bos, *d1[:16], *sep, *[5] * 20, eos]
    assert len(shortened["input_ids"]) == 40
    # d2 of 32 tokens leaves d1 4 tokens, a quarter of its budget; 33 would leave 3: dropped
    assert pair_row(d1, [5] * 32, sep, bos, eos, max_length=40) == {
        "input_ids": [bos, *d1[:4], *sep, *[5] * 32, eos], "loss_from": 7}
    assert pair_row(d1, [5] * 33, sep, bos, eos, max_length=40) is None
    # a d1 shorter than the floor is kept whole; without an EOS id d2 is cut as before
    assert pair_row([100, 101], [5] * 34, sep, bos, eos, max_length=40)["input_ids"][-1] == eos
    assert pair_row(d1, [5] * 50, sep, bos, None, max_length=40)["input_ids"] == [
        bos, *d1[:budget], *sep, *[5] * 19]


def test_pairs_whose_d2_never_fits_are_refused_in_one_line(pairs_dir):
    from selftrain.errors import SelftrainError
    from selftrain.training.data import CorpusDataModule

    data = CorpusDataModule(str(pairs_dir), tokenizer="tiny:qwen2", max_length=60,
                            batch_size=4)
    with pytest.raises(SelftrainError, match=r"^--data.max_length 60: no pair's d2 fits whole"):
        data.load()


@pytest.fixture(scope="module")
def synthesizer(tmp_path_factory) -> Path:
    """A tiny Qwen2 saved as a synthesizer export (with the pair layout fit would record)."""
    from selftrain.models import EXPORT_INFO, load_model

    target = tmp_path_factory.mktemp("synth") / "hf"
    load_model("tiny:qwen2").save_pretrained(target)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(target)
    layout = {"separator": DEFAULT_SEPARATOR, "max_d1_tokens": 24,
              "bos_token_id": tokenizer.bos_token_id or 256}
    (target / EXPORT_INFO).write_text(json.dumps({"student": "tiny:qwen2",
                                                  "pair_layout": layout}))
    return target


@pytest.mark.slow
def test_synthesis_killed_resumes_to_exactly_n_rows_as_one_run_writes_them(
        tmp_path, synthesizer):
    seeds = known_neighbours(tmp_path / "seeds.jsonl")
    out = tmp_path / "sbp"
    args = ["synthesize", "--synthesizer", str(synthesizer), "--seeds", str(seeds),
            "--num_samples", "240", "--max_new_tokens", "40", "--shard_size", "12",
            "--batch_size", "8", "--num_subsets", "2", "--seed", "3", "--device", "cpu"]
    kill_when([sys.executable, "-m", "selftrain", *args, "--out", str(out)],
              lambda: len(list((out / "data").glob("*.parquet"))) >= 3, poll=0.005)
    assert not (out / "manifest.json").exists(), "the run must be killed before the end"
    result = succeeded(selftrain(*args, "--out", str(out), "--batch_size", "5"))
    assert "resuming" in result.stderr

    from selftrain.synthesis.synthesize import synthesize

    reference = synthesize(str(synthesizer), seeds=str(seeds), out=str(tmp_path / "reference"),
                           num_samples=240, max_new_tokens=40, shard_size=240, batch_size=16,
                           num_subsets=2, seed=3, device="cpu")
    corpus, expected = read_corpus(out).columns, read_corpus(reference).columns
    assert corpus["id"] == list(range(240))
    assert corpus["input_ids"] == expected["input_ids"]
    assert corpus["seed_id"] == expected["seed_id"]
    assert set(corpus["seed_id"]) <= {*range(10), 100} and len(set(corpus["seed_id"])) > 5
    manifest = manifest_of(out)
    assert manifest["kind"] == "sbp" and manifest["counts"]["written"] == 240
    assert manifest["pair_layout"]["separator"] == DEFAULT_SEPARATOR
    assert manifest["timing"]["samples_this_run"] < 240


def test_a_synthesizer_trained_again_in_place_does_not_complete_the_old_corpus(
        tmp_path, synthesizer):
    import shutil

    import torch

    from selftrain.errors import SelftrainError
    from selftrain.models import load_model
    from selftrain.synthesis.synthesize import synthesize

    export = Path(shutil.copytree(synthesizer, tmp_path / "hf"))
    seeds = str(known_neighbours(tmp_path / "seeds.jsonl"))
    out = str(tmp_path / "sbp")
    flags = {"seeds": seeds, "out": out, "num_samples": 2, "max_new_tokens": 3, "device": "cpu"}
    synthesize(str(export), **flags)
    synthesize(str(export), **flags)  # done
    model = load_model(str(export))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)
    model.save_pretrained(export)  # same path, same config: new weights
    with pytest.raises(SelftrainError, match="weights_sha256"):
        synthesize(str(export), **flags)


def test_synthesis_continues_bos_seed_separator_as_greedy_generate_does(tmp_path, synthesizer):
    """Near-greedy synthesis of sample i equals HF greedy ``generate`` on BOS d1 SEP."""
    import torch

    from selftrain.models import load_model
    from selftrain.synthesis.synthesize import seed_row, synthesize

    seeds = known_neighbours(tmp_path / "seeds.jsonl")
    out = synthesize(str(synthesizer), seeds=str(seeds), out=str(tmp_path / "sbp"), num_samples=4,
                     max_new_tokens=6, temperature=1e-6, batch_size=3, device="cpu")
    rows = read_corpus(out).columns
    docs = [json.loads(line) for line in seeds.read_text().splitlines()]

    def choose(i: int) -> int:
        return seed_row(0, i, len(docs))

    assert rows["seed_id"] == [docs[choose(i)]["id"] for i in range(4)]
    tokenizer, model = tiny_tokenizer(), load_model(str(synthesizer)).eval()
    sep = separator_ids(tokenizer, DEFAULT_SEPARATOR, "--separator")
    bos = rows["input_ids"][0][0]
    for i in range(4):
        d1 = tokenizer(docs[choose(i)]["text"], add_special_tokens=False)["input_ids"]
        prompt = torch.tensor([[bos, *d1[:24], *sep]])
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=6, pad_token_id=0)[0, prompt.shape[1]:]
        assert rows["input_ids"][i][1:] == greedy.tolist()[:len(rows["input_ids"][i]) - 1]


def test_unseeded_synthesis_continues_bos_separator_alone(tmp_path, synthesizer):
    """The control: every document continues ``BOS SEP`` (an empty d1) as greedy generate."""
    import torch

    from selftrain.models import load_model
    from selftrain.synthesis.synthesize import UNSEEDED, synthesize

    out = synthesize(str(synthesizer), out=str(tmp_path / "unseeded"), unseeded=True,
                     num_samples=3, max_new_tokens=6, temperature=1e-6, device="cpu")
    rows = read_corpus(out).columns
    assert rows["seed_id"] == [UNSEEDED] * 3
    manifest = manifest_of(out)
    assert manifest["seeds"] is None and manifest["generation"]["unseeded"] is True
    tokenizer, model = tiny_tokenizer(), load_model(str(synthesizer)).eval()
    sep = separator_ids(tokenizer, DEFAULT_SEPARATOR, "--separator")
    prompt = torch.tensor([[rows["input_ids"][0][0], *sep]])
    greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                            max_new_tokens=6, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    for ids in rows["input_ids"]:  # near-greedy: the same document three times
        assert ids[1:] == greedy[:len(ids) - 1]


@pytest.mark.parametrize("flags, message", [
    ({}, "--seeds: give the real corpus the seed documents are drawn from, or --unseeded true "
         "for the control"),
    ({"unseeded": True, "seeds": "x.jsonl"}, "--unseeded true: the control reads no seeds; "
                                             "drop --seeds, --seeds_subset and "
                                             "--seeds_num_subsets"),
    ({"unseeded": True, "seeds_num_subsets": 3}, "--unseeded true: the control reads no "
                                                 "seeds; drop --seeds, --seeds_subset and "
                                                 "--seeds_num_subsets")])
def test_seeds_and_the_unseeded_control_are_one_or_the_other(tmp_path, synthesizer, flags,
                                                             message):
    from selftrain.errors import SelftrainError
    from selftrain.synthesis.synthesize import synthesize

    with pytest.raises(SelftrainError) as refused:
        synthesize(str(synthesizer), out=str(tmp_path / "out"), device="cpu", **flags)
    assert str(refused.value) == message
    assert not (tmp_path / "out").exists()
