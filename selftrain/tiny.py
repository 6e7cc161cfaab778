"""Randomly initialised causal LMs and an offline byte-level tokenizer: tiny and real-size.

Tests and the debug config need real transformers model classes (Qwen2, Llama, GPT-NeoX) that
run in milliseconds and never touch a hub. Everything here is built from config objects in
process, with a fixed seed, so `tiny:qwen2` is the same model every time it is loaded: a
source and a student given the same spec start identical, as in real self-training.

Speed and memory benchmarks need the opposite: a real model's exact architecture and size
(``shape:qwen2.5-0.5b``, ``shape:smollm2-135m``) without its weights or a hub. Those are built
the same way, at full size, with fixed-seed random weights and the tiny byte-level tokenizer of
their family (benchmarks feed random token ids, so the text side does not matter).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY_SEED = 1234
"""Seed for the weights of every tiny model, so a spec always means the same weights."""


@dataclass(frozen=True)
class TinyFamily:
    """How one model family is shrunk: its classes and its special tokens.

    Args:
        config_cls: transformers config class of the family.
        model_cls: transformers causal-LM class of the family.
        bos_token: the tokenizer's BOS token, or None where the family has none (Qwen2).
        eos_token: the tokenizer's EOS token.
        config_bos: whether the model config carries a BOS id (Qwen2's does not).
    """

    config_cls: type
    model_cls: type[PreTrainedModel]
    bos_token: str | None
    eos_token: str
    config_bos: bool = True


TINY_FAMILIES: dict[str, TinyFamily] = {
    "qwen2": TinyFamily(Qwen2Config, Qwen2ForCausalLM, None, "<|endoftext|>", config_bos=False),
    "llama": TinyFamily(LlamaConfig, LlamaForCausalLM, "<s>", "</s>"),
    "gpt_neox": TinyFamily(GPTNeoXConfig, GPTNeoXForCausalLM, "<|endoftext|>", "<|endoftext|>"),
}

TINY_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512}
"""One shared shrink for every family: small enough for a CPU test, big enough to learn."""


def build_tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """Build a byte-level tokenizer (256 byte tokens plus the family's specials) offline.

    Args:
        family: one of :data:`TINY_FAMILIES`.

    Returns:
        A fast tokenizer that round-trips any UTF-8 text, one token per byte.
    """
    spec = TINY_FAMILIES[family]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials = [t for t in dict.fromkeys([spec.bos_token, spec.eos_token]) if t is not None]
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=spec.bos_token,
        eos_token=spec.eos_token,
        pad_token=spec.eos_token,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.name_or_path = f"tiny:{family}"
    return tokenizer


def build_tiny_model(family: str, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """Build the tiny model of a family with fixed-seed random weights.

    Args:
        family: one of :data:`TINY_FAMILIES`.
        tokenizer: the tokenizer from :func:`build_tiny_tokenizer` (sets vocab and special ids).

    Returns:
        The model in float32, train mode off (as `from_pretrained` returns it).
    """
    spec = TINY_FAMILIES[family]
    vocab_size = (len(tokenizer) + 7) // 8 * 8
    config = spec.config_cls(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id if spec.config_bos else None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **TINY_SHAPE,
    )
    # drawn on the CPU whatever the default device: Lightning builds the student under DDP's
    # device context on the GPU but under FSDP's on the CPU, and the two generators differ
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(TINY_SEED)
        model = spec.model_cls(config)
    model.to(torch.get_default_device())
    model.config.name_or_path = f"tiny:{family}"
    model.eval()
    return model


@dataclass(frozen=True)
class ModelShape:
    """A real model's architecture, to be built with random weights (``shape:<name>``).

    Args:
        family: the :data:`TINY_FAMILIES` key giving the model class and the tokenizer.
        dims: config fields copied from the reference model's ``config.json``.
        reference: the hub model whose dimensions these are.
    """

    family: str
    dims: dict
    reference: str


MODEL_SHAPES: dict[str, ModelShape] = {
    "qwen2.5-0.5b": ModelShape("qwen2", {
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
        "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 24,
        "initializer_range": 0.02, "tie_word_embeddings": True}, "Qwen/Qwen2.5-0.5B"),
    "smollm2-135m": ModelShape("llama", {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 100_000.0, "initializer_range": 0.041666666666666664,
        "tie_word_embeddings": True}, "HuggingFaceTB/SmolLM2-135M"),
}
"""``shape:<name>`` -> the real model's dimensions (random weights, tiny tokenizer)."""

SHAPE_SEED = TINY_SEED
"""Seed for the weights of every ``shape:`` model."""


def shape_config(name: str, tokenizer: PreTrainedTokenizerFast | None = None):
    """The transformers config of a ``shape:`` model, without building any weights.

    Special-token ids are the tiny tokenizer's (the one :func:`build_shape_model` pairs with
    the model), so BOS resolution and EOS detection agree with the tokenizer.

    Args:
        name: a :data:`MODEL_SHAPES` key.
        tokenizer: that family's tiny tokenizer; built when None.
    """
    shape = MODEL_SHAPES[name]
    family = TINY_FAMILIES[shape.family]
    tokenizer = tokenizer or build_tiny_tokenizer(shape.family)
    config = family.config_cls(
        bos_token_id=tokenizer.bos_token_id if family.config_bos else None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape.dims,
    )
    config.name_or_path = f"shape:{name}"
    return config


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _no_init_weights():
    """The context of transformers that skips weight init (moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def build_shape_model(name: str, tokenizer: PreTrainedTokenizerFast | None = None,
                      dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Build a real-size model with fixed-seed random weights directly in ``dtype``.

    It is built on the default device (the CPU, or the GPU inside Lightning's
    ``init_module``); the weights are drawn on the CPU either way, so they are the same.

    The modules are created without transformers' or torch's own initialisation (which draws
    every weight twice, about 13 s for 0.5B parameters on 2 cores), then every matrix is drawn
    once from N(0, initializer_range) with a generator seeded by :data:`SHAPE_SEED`, norms are
    set to 1 and biases to 0: the same distribution transformers uses, a few seconds for 0.5B.

    Args:
        name: a :data:`MODEL_SHAPES` key.
        tokenizer: that family's tiny tokenizer (sets the special ids); built when None.
        dtype: parameter dtype (float32, bfloat16, float16).

    Returns:
        The model, train mode off (as `from_pretrained` returns it), embeddings tied.
    """
    shape = MODEL_SHAPES[name]
    config = shape_config(name, tokenizer)
    with _default_dtype(dtype), _no_init_weights():
        model = TINY_FAMILIES[shape.family].model_cls(config)
    model.tie_weights()
    generator = torch.Generator().manual_seed(SHAPE_SEED)
    with torch.no_grad():
        for param_name, param in model.named_parameters():  # tied weights come once
            if param.ndim >= 2:  # drawn on the CPU: the same weights on every device
                drawn = torch.empty(param.shape, dtype=param.dtype, device="cpu")
                param.copy_(drawn.normal_(0.0, config.initializer_range, generator=generator))
            elif param_name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    model.eval()
    return model
