"""selftrain.models and selftrain.tiny: model specs, tiny and shape models, BOS, fingerprints.

Also what a spec is refused for before anything loads: a local dir missing config, weights or
tokenizer, a tokenizer without vocabulary, token-id and dtype flags.
"""

import re

import pytest
import torch

from selftrain.errors import SelftrainError
from selftrain.models import (
    ModelSpec,
    as_dtype,
    check_token_id,
    load_model,
    load_tokenizer,
    model_revision,
    parse_model_spec,
    resolve_bos_id,
    tokenizer_fingerprint,
)
from selftrain.tiny import MODEL_SHAPES, TINY_FAMILIES, shape_config


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
    ("shape:gpt5", "unknown model shape"),
    ("", "is empty"),
])
def test_bad_specs_name_the_flag(spec, fragment):
    with pytest.raises(SelftrainError, match=fragment) as error:
        parse_model_spec(spec, flag="--model.model")
    assert "--model.model" in str(error.value)
    assert "\n" not in str(error.value)


def test_hub_ids_and_local_dirs_parse_without_loading(tmp_path):
    assert parse_model_spec("Qwen/Qwen2.5-0.5B").kind == "hub"
    load_model("tiny:qwen2").save_pretrained(tmp_path)
    load_tokenizer("tiny:qwen2").save_pretrained(tmp_path)
    assert parse_model_spec(str(tmp_path)).kind == "hub"


@pytest.mark.parametrize("make, fragment", [
    (lambda path: path.mkdir(), "no config.json and no weights"),
    (lambda path: load_model("tiny:qwen2").config.save_pretrained(path),
     "no weights (*.safetensors or *.bin) and no tokenizer files"),
    (lambda path: load_model("tiny:qwen2").save_pretrained(path), "no tokenizer files"),
    (lambda path: path.write_text("weights"), "is a file"),
    (lambda path: None, "no such directory"),
])
def test_a_local_model_dir_must_hold_config_weights_and_tokenizer(tmp_path, make, fragment):
    path = tmp_path / "model"
    make(path)
    for load in (parse_model_spec, load_tokenizer, load_model):
        with pytest.raises(SelftrainError, match=re.escape(fragment)) as error:
            load(str(path), flag="--student")
        assert str(error.value).startswith(f"--student {path}: ")


def test_a_tokenizer_without_vocabulary_is_refused(tmp_path):
    """transformers builds a one-token tokenizer from a config without vocabulary files."""
    load_model("tiny:qwen2").save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "Qwen2Tokenizer"}')
    with pytest.raises(SelftrainError, match="has no vocabulary"):
        load_tokenizer(str(tmp_path), flag="--model.model")


@pytest.mark.parametrize("token_id, size, message", [
    (-1, None, "--bos_token_id -1: a token id must be >= 0"),
    (257, 257, "--bos_token_id 257: a token id must be in 0..256"),
])
def test_token_id_flags_are_checked_against_the_vocabulary(token_id, size, message):
    check_token_id(None, 5, "--bos_token_id")
    check_token_id(256, 257, "--bos_token_id")
    with pytest.raises(SelftrainError, match=re.escape(message)):
        check_token_id(token_id, size, "--bos_token_id")


def test_unknown_dtype_names_the_flag():
    assert as_dtype("bf16") is torch.bfloat16 and as_dtype("auto") is None
    with pytest.raises(SelftrainError, match=r"^--dtype float8: unknown dtype"):
        as_dtype("float8")


def test_unreachable_hub_model_is_one_clear_error():
    with pytest.raises(SelftrainError, match="^--model no-such-org/no-such-model-xyz: cannot "
                                             "load its tokenizer"):
        load_tokenizer("no-such-org/no-such-model-xyz")


def test_shape_specs_parse_without_building():
    assert parse_model_spec("shape:qwen2.5-0.5b") == ModelSpec("shape", "qwen2.5-0.5b")
    assert str(parse_model_spec(" shape:smollm2-135m ")) == "shape:smollm2-135m"
    assert model_revision("shape:qwen2.5-0.5b", None) == "shape:qwen2.5-0.5b@seed1234"


def test_unknown_shape_lists_the_known_ones():
    with pytest.raises(SelftrainError, match="unknown model shape") as error:
        parse_model_spec("shape:qwen2.5-7b")
    for name in MODEL_SHAPES:
        assert f"shape:{name}" in str(error.value)


@pytest.mark.parametrize("name, params, dims", [
    # the reference checkpoints' sizes (tied embeddings counted once)
    ("qwen2.5-0.5b", 494_032_768, (896, 4864, 24, 14, 2, 151936)),
    ("smollm2-135m", 134_515_008, (576, 1536, 30, 9, 3, 49152)),
])
def test_shapes_have_the_real_dims_and_size(name, params, dims):
    config = shape_config(name)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == dims
    assert config.tie_word_embeddings
    cls = TINY_FAMILIES[MODEL_SHAPES[name].family].model_cls
    with torch.device("meta"):  # no memory: sizes only
        model = cls(config)
    model.tie_weights()
    assert sum(p.numel() for p in model.parameters()) == params


def test_qwen_shape_config_matches_qwen25():
    config = shape_config("qwen2.5-0.5b")
    assert config.rms_norm_eps == 1e-6 and config.max_position_embeddings == 32768
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert rope["rope_theta"] == 1e6


def test_shape_model_builds_fixed_seed_in_dtype_with_its_tokenizer():
    tokenizer = load_tokenizer("shape:smollm2-135m")
    first = load_model("shape:smollm2-135m", dtype="bfloat16", attn_implementation="sdpa")
    assert first.dtype == torch.bfloat16
    assert first.lm_head.weight is first.model.embed_tokens.weight
    weight = first.model.layers[0].mlp.up_proj.weight
    assert 0.03 < float(weight.detach().float().std()) < 0.05  # N(0, initializer_range)
    assert torch.equal(first.model.norm.weight, torch.ones_like(first.model.norm.weight))
    assert resolve_bos_id(tokenizer, first.config) == (tokenizer.bos_token_id,
                                                      "tokenizer.bos_token_id")
    assert first.config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer("hi there")["input_ids"]])
    assert first(ids).logits.shape == (1, ids.shape[1], 49152)
    second = load_model("shape:smollm2-135m", dtype="bfloat16")
    assert torch.equal(first.model.embed_tokens.weight, second.model.embed_tokens.weight)
