"""selftrain.training.loss: the chunked loss is transformers' loss, without the whole logits.

The loss and every gradient equal ``model(**batch).loss``'s on the tiny families and on tiny
Gemma 3 (soft-capped logits) and Granite (scaled logits) built from config objects, padded and
packed, with chunks that do not divide the targets and one larger than all of them; no tensor
of ``tokens x vocabulary`` is kept for backward; a fit with ``--model.loss_chunk`` logs the
default fit's losses; bad settings are refused in one line.
"""

import pytest
import torch
from helpers import fit_cli, make_student, without_gpus
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GraniteConfig, GraniteForCausalLM

from selftrain.analysis.tb import read_scalars
from selftrain.errors import SelftrainError
from selftrain.models import load_model
from selftrain.tiny import TINY_FAMILIES, TINY_SEED, TINY_SHAPE
from selftrain.training.batching import pad_collate
from selftrain.training.loss import (
    IGNORE,
    causal_lm_loss,
    check_loss_flags,
    chunked_loss_refusal,
    uses_liger,
)
from selftrain.training.packing import pack_collate

LENGTHS = [17, 5, 30, 2, 11]
TARGETS = sum(LENGTHS) - len(LENGTHS)  # 60: every token but each document's first
CHUNKS = [7, 4096]  # 7 does not divide 60; 4096 holds them all in one chunk
VOCAB = 264


def random_rows(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 250, (n,), generator=generator).tolist()}
            for n in LENGTHS]


def config_built(model_cls, config):
    """A tiny model of a family tiny.py does not build, fixed seed, float32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return model_cls(config)


def gemma3():
    """Tiny Gemma 3 whose soft cap bites: cap 2, logits of up to about 7 (wider init)."""
    shape = {**TINY_SHAPE, "head_dim": 16}
    return config_built(Gemma3ForCausalLM, Gemma3TextConfig(
        vocab_size=VOCAB, final_logit_softcapping=2.0, initializer_range=0.2,
        tie_word_embeddings=True, **shape))


def granite():
    """Tiny Granite, which divides its logits by ``logits_scaling``."""
    return config_built(GraniteForCausalLM, GraniteConfig(
        vocab_size=VOCAB, logits_scaling=4.0, initializer_range=0.2, tie_word_embeddings=True,
        **TINY_SHAPE))


MODELS = {**{family: (lambda f=family: load_model(f"tiny:{f}")) for family in TINY_FAMILIES},
          "gemma3": gemma3, "granite": granite}
LAYOUTS = {"padded": lambda rows: pad_collate(rows, pad_id=0), "packed": pack_collate}


def loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("family", sorted(MODELS))
def test_loss_and_gradients_equal_transformers(family, layout, chunk):
    model = MODELS[family]().train()
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embeddings.weight  # tied: the head's gradient must reach them
    batch = LAYOUTS[layout](random_rows())
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) == TARGETS
    expected, expected_grads = loss_and_grads(model, lambda: model(**batch, use_cache=False).loss)
    ours, grads = loss_and_grads(model, lambda: causal_lm_loss(model, batch, chunk))
    assert ours.dtype == torch.float32
    # float32 summation order apart (measured: <= 2e-7 relative)
    assert float(ours) == pytest.approx(float(expected), rel=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert relative(grad, expected_grads[name]) <= 1e-6, name


@pytest.mark.parametrize("family, field, neutral", [("gemma3", "final_logit_softcapping", None),
                                                     ("granite", "logits_scaling", 1.0)])
def test_the_logit_transform_is_what_makes_them_equal(family, field, neutral):
    # the two families' own transforms move the loss far more than the tolerance above, so
    # the equality there is not an accident of small logits
    model = MODELS[family]().eval()
    batch = pad_collate(random_rows(), pad_id=0)
    with torch.no_grad():
        expected = float(model(**batch, use_cache=False).loss)
        setattr(model.config, field, neutral)
        untransformed = float(causal_lm_loss(model, batch, 16))
    assert abs(untransformed - expected) > 1e-2 * expected


@pytest.mark.parametrize("family", ["qwen2", "granite"])
def test_a_family_whose_logits_the_chunks_miss_is_refused_at_the_first_batch(family):
    # as falcon_h1 multiplies its logits in its forward: the chunks would train another loss
    model = MODELS[family]().eval()
    batch = pad_collate(random_rows(), pad_id=0)
    assert chunked_loss_refusal(model, batch, 7) is None  # a family loss.py knows

    class MultipliedLogits(type(model)):
        def forward(self, *args, labels=None, **kwargs):
            out = super().forward(*args, **kwargs)
            out.loss = self.loss_function(out.logits * 30.0, labels,
                                          vocab_size=self.config.vocab_size)
            return out

    model.__class__ = MultipliedLogits
    refusal = chunked_loss_refusal(model, batch, 7)
    assert refusal.startswith("--model.loss_chunk 7: the chunked loss of the first batch's "
                              "row 2 is ")
    assert "unset --model.loss_chunk for this student" in refusal


def test_no_tokens_by_vocabulary_tensor_is_kept_for_backward():
    model = load_model("tiny:llama").train()
    batch = pad_collate(random_rows(), pad_id=0)
    rows = batch["input_ids"].numel()

    def largest_saved(loss_fn) -> int:
        """Elements of the largest tensor with a vocabulary dimension saved for backward."""
        sizes = [0]

        def pack(tensor):
            if tensor.shape and tensor.shape[-1] == VOCAB:
                sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss_fn()
        return max(sizes)

    assert largest_saved(lambda: model(**batch, use_cache=False).loss) >= rows * VOCAB
    # the head's weight is VOCAB x hidden (not a trailing vocabulary dim); no logits at all
    assert largest_saved(lambda: causal_lm_loss(model, batch, 8)) == 0


def test_a_batch_without_targets_is_nan_as_in_transformers():
    model = load_model("tiny:qwen2")
    batch = pad_collate(random_rows(), pad_id=0)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE)
    with torch.no_grad():
        assert torch.isnan(model(**batch, use_cache=False).loss)
        assert torch.isnan(causal_lm_loss(model, batch, 8))


def test_student_uses_the_chunked_loss_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr("selftrain.training.module.causal_lm_loss",
                        lambda *args, **kwargs: calls.append(args[2]) or torch.tensor(1.0))
    batch = pad_collate(random_rows(), pad_id=0)
    make_student()._loss(batch)
    assert calls == []
    chunked = make_student(loss_chunk=5)
    chunked._loss(batch)
    assert calls == [5] and chunked._fused_loss is False  # no CUDA here: torch's chunks


@pytest.mark.parametrize("chunk, kernel, words", [
    (0, "auto", "--model.loss_chunk 0: must be >= 1"),
    (-3, "torch", "--model.loss_chunk -3: must be >= 1"),
    (None, "liger", "set --model.loss_chunk too"),
])
def test_bad_settings_are_refused(chunk, kernel, words):
    with pytest.raises(SelftrainError, match=words):
        check_loss_flags(chunk, kernel)


def test_liger_is_refused_where_it_cannot_run(monkeypatch):
    without_gpus(monkeypatch)
    with pytest.raises(SelftrainError, match="--model.loss_kernel liger: it needs a CUDA GPU"):
        uses_liger("liger", torch.device("cpu"), None)
    cohere_like = type("Config", (), {"logit_scale": 0.5})()
    with pytest.raises(SelftrainError, match="Cohere's logit scaling"):
        uses_liger("liger", torch.device("cuda"), cohere_like)
    assert not uses_liger("auto", torch.device("cpu"), None)  # auto falls back to torch
    assert not uses_liger("torch", torch.device("cuda"), None)


def train_losses(run):
    return [value for _, value in read_scalars(run / "tb")["train/loss"]]


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["false", "true"])
def test_fit_with_loss_chunk_logs_the_default_losses(tmp_path, packing):
    flags = ("--trainer.max_epochs", "1", "--data.packing", packing)
    fit_cli(tmp_path / "default", *flags, callbacks=False, export=False)
    built = fit_cli(tmp_path / "chunked", *flags, "--model.loss_chunk", "100",
                    callbacks=False, export=False)
    assert built.model.hparams.loss_chunk == 100 and built.model._fused_loss is False
    default, chunked = train_losses(tmp_path / "default"), train_losses(tmp_path / "chunked")
    assert len(chunked) == len(default) == 24
    # same batches and weights; float32 summation order apart, carried through 24 AdamW steps
    assert chunked == pytest.approx(default, rel=1e-5)
