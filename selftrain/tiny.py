"""Tiny randomly initialised causal LMs and an offline byte-level tokenizer.

Tests and the debug config need real transformers model classes (Qwen2, Llama, GPT-NeoX) that
run in milliseconds and never touch a hub. Everything here is built from config objects in
process, with a fixed seed, so `tiny:qwen2` is the same model every time it is loaded: a
source and a student given the same spec start identical, as in real self-training.
"""

from __future__ import annotations

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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = spec.model_cls(config)
    model.config.name_or_path = f"tiny:{family}"
    model.eval()
    return model
