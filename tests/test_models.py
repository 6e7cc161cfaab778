import pytest
import torch

from selftrain.errors import SelftrainError
from selftrain.models import (
    load_model,
    load_tokenizer,
    parse_model_spec,
    resolve_bos_id,
    tokenizer_fingerprint,
)
from selftrain.tiny import TINY_FAMILIES


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_tiny_models_load_and_run(family):
    tokenizer = load_tokenizer(f"tiny:{family}")
    model = load_model(f"tiny:{family}")
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "hello world"
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)
    assert model.config.vocab_size >= len(tokenizer)


def test_tiny_weights_are_the_same_every_load():
    first, second = load_model("tiny:llama"), load_model("tiny:llama")
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bos_resolution_per_family():
    qwen_tok, qwen = load_tokenizer("tiny:qwen2"), load_model("tiny:qwen2")
    assert qwen_tok.bos_token_id is None  # like Qwen2.5: no BOS token
    assert resolve_bos_id(qwen_tok, qwen.config) == (qwen_tok.eos_token_id,
                                                     "tokenizer.eos_token_id")
    llama_tok = load_tokenizer("tiny:llama")
    assert resolve_bos_id(llama_tok) == (llama_tok.bos_token_id, "tokenizer.bos_token_id")
    assert resolve_bos_id(llama_tok, override=7) == (7, "override")


def test_fingerprint_tells_tokenizers_apart():
    qwen, neox, llama = (load_tokenizer(f"tiny:{f}") for f in ("qwen2", "gpt_neox", "llama"))
    assert tokenizer_fingerprint(qwen) == tokenizer_fingerprint(neox)  # same vocab + specials
    assert tokenizer_fingerprint(qwen) != tokenizer_fingerprint(llama)


@pytest.mark.parametrize("spec, fragment", [
    ("tiny:gpt5", "unknown tiny family"),
    ("embedded:gpt2", "unknown embedded model"),
    ("weird:thing", "unknown model scheme"),
    ("", "is empty"),
])
def test_bad_specs_name_the_flag(spec, fragment):
    with pytest.raises(SelftrainError, match=fragment) as error:
        parse_model_spec(spec, flag="--model.model")
    assert "--model.model" in str(error.value)
    assert "\n" not in str(error.value)


def test_hub_ids_and_local_dirs_parse_without_loading(tmp_path):
    assert parse_model_spec("Qwen/Qwen2.5-0.5B").kind == "hub"
    assert parse_model_spec(str(tmp_path)).kind == "hub"


def test_unreachable_hub_model_is_one_clear_error():
    with pytest.raises(SelftrainError, match="cannot load"):
        load_tokenizer("no-such-org/no-such-model-xyz")
