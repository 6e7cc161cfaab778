"""selftrain.training.data: CorpusDataModule, the rows' loaders and state.

It trains on the rows :func:`selftrain.training.rows.build_rows` makes (tests/test_rows.py
tests those), refuses bad ``--data.*`` arguments in its constructor, gives the student's
revision to its tokenizer, and packs the same batches it would pad.
"""

import pytest

from selftrain.errors import SelftrainError
from selftrain.models import load_tokenizer
from selftrain.training.data import CorpusDataModule
from selftrain.training.rows import RowSettings, build_rows


def setup_dm(corpus, **kwargs):
    dm = CorpusDataModule(corpus=str(corpus), **{"tokenizer": "tiny:qwen2", **kwargs})
    dm.setup("fit")
    return dm


def test_the_module_trains_on_the_rows_build_rows_makes(qwen_corpus, llama_corpus):
    for corpus in (qwen_corpus, llama_corpus):
        chosen = {"subset": 1, "num_subsets": 2, "max_length": 12}
        dm = setup_dm(corpus, eval_corpus=str(corpus), **chosen)
        plan = build_rows(str(corpus), load_tokenizer("tiny:qwen2"), RowSettings(**chosen),
                          eval_corpus=str(corpus))
        assert (dm.rows, dm.eval_rows) == (plan.rows, plan.eval_rows)
        assert (dm.stats["rows"], dm.stats["dropped"], dm.stats["retokenized"]) == (
            len(plan.rows), plan.dropped, not plan.reused)
        assert dm.stats["tokens"] == sum(len(row["input_ids"]) for row in plan.rows)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"max_length": 1}, "--data.max_length"),
    ({"batch_size": 0}, "--data.batch_size"),
    ({"corpus": "/nonexistent/corpus"}, "--data.corpus"),
    ({"subset": 3, "num_subsets": 2}, "--data.subset"),
    ({"group_batches": -1}, "--data.group_batches -1"),
    ({"pad_to_multiple_of": 0}, "--data.pad_to_multiple_of 0"),
    ({"num_workers": -1}, "--data.num_workers -1"),
    ({"min_real_token_fraction": 1.5}, "--data.min_real_token_fraction 1.5"),
    ({"seed": -1}, "--data.seed -1"),
    ({"seed": 2**64}, "--data.seed 18446744073709551616"),
    ({"bos_token_id": -1}, "--data.bos_token_id -1"),
    ({"tokenizer": "tiny:nope"}, "--model.model 'tiny:nope'"),
])
def test_bad_arguments_fail_in_init(qwen_corpus, kwargs, fragment):
    with pytest.raises(SelftrainError, match=fragment):
        CorpusDataModule(**{"corpus": str(qwen_corpus), **kwargs})


def test_bos_outside_the_students_vocabulary_is_refused_at_load(llama_corpus):
    with pytest.raises(SelftrainError, match=r"^--data.bos_token_id 257: a token id must be "
                                             r"in 0..256"):
        setup_dm(llama_corpus, bos_token_id=257)


def test_the_students_revision_reaches_its_tokenizer(qwen_corpus, monkeypatch):
    import selftrain.training.data as data

    seen = []
    real = data.load_tokenizer
    monkeypatch.setattr(data, "load_tokenizer",
                        lambda spec, **kwargs: seen.append(kwargs) or real(spec, **kwargs))
    setup_dm(qwen_corpus, revision="v1.0")
    assert seen == [{"revision": "v1.0", "flag": "--model.model"}]


def test_packing_packs_the_same_batches_without_padding(qwen_corpus, recwarn):
    kwargs = {"max_length": 1000, "batch_size": 4, "min_real_token_fraction": 1.0,
              "eval_corpus": str(qwen_corpus)}
    padded = setup_dm(qwen_corpus, **kwargs)
    assert padded.stats["packing"] is False and padded.stats["real_token_fraction"] < 1.0
    assert any("real-token fraction" in str(w.message) for w in recwarn)
    recwarn.clear()
    packed = setup_dm(qwen_corpus, packing=True, **kwargs)
    assert packed.stats["packing"] is True and packed.stats["real_token_fraction"] == 1.0
    assert packed.stats["padded_real_token_fraction"] == padded.stats["real_token_fraction"]
    assert not [w for w in recwarn if "real-token fraction" in str(w.message)]  # nothing padded
    for loaders in ((padded.train_dataloader(), packed.train_dataloader()),
                    (padded.val_dataloader(), packed.val_dataloader())):
        batches = list(zip(*loaders, strict=True))
        assert len(batches) == 12
        for pad, pack in batches:  # same documents in the same order, end to end
            assert "attention_mask" not in pack and pack["input_ids"].shape[0] == 1
            real = pad["input_ids"][pad["attention_mask"].bool()]
            assert pack["input_ids"][0].tolist() == real.tolist()
            assert (pack["labels"] != -100).sum() == (pad["labels"] != -100).sum() - len(
                pad["input_ids"])
